"""``DPOptimizer``: a torch optimizer whose ``step()`` is the private step of a logical batch.

``step()`` runs three named phases:

1. **clip and accumulate** — per micro-batch, the clipped sum of per-example gradients from the output
   gradient ``c = ∂loss/∂output`` that ``loss.backward()`` left on the forward's output. With the fast
   engine this is the one backward through the graph that :class:`~dpfunc.bridge.PrivateModule` kept
   from the forward (no second forward); with the vmap engine, ``vmap`` of the surrogate loss
   ``ℓ_i(θ) = ⟨f(θ, x_i), s·c_i⟩`` (``s`` = batch size for a mean-reduced loss, 1 for a sum), whose
   gradient ``J_iᵀ s c_i`` is exactly example ``i``'s gradient of the user's loss.
2. **add noise** — at the end of a logical batch only: :func:`dpfunc.dp_aggregate` adds noise once,
   divides by the expected batch size and records the step in its ledger.
3. **inner step** — the private mean is written to ``p.grad`` and the user's torch optimizer steps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dpfunc import accounting
from dpfunc.accounting.ledger import PrivacyLedger
from dpfunc.clipping import ClippedSum, Clipping, flush_nonfinite_checks
from dpfunc.keys import Key, run_keys
from dpfunc.adaptive_clipping import AdaptiveDPConfig, bound_from_plain, bound_to_plain, dp_transform, replace_dp_state
from dpfunc.private import DPAggregateState, DPConfig, check_budget, find_dp_state
from dpfunc.step import vmap_engine
from dpfunc.bridge.functional import keyed_global_rng, module_apply_fn
from dpfunc.bridge.module import PrivateModule, _MicroBatch

__all__ = ["DPOptimizer"]


def _output_surrogate(out: Any, *cs: torch.Tensor) -> torch.Tensor:
    """Per-example ``⟨f(x_i), c_i⟩`` over the model's outputs: its gradient at the output is ``c``."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum((o * c).reshape(o.shape[0], -1).sum(1) for o, c in zip(outs, cs))


def _zero_clipped(params: dict[str, torch.Tensor], clipping: Clipping) -> ClippedSum:
    names = list(params)
    ref = next(iter(params.values()))
    empty = ref.new_zeros((0,))
    groups = clipping.group_bounds(names)
    return ClippedSum(
        {k: torch.zeros_like(v) for k, v in params.items()},
        empty,
        {g: empty for g in groups},
        clipping.sensitivity(names),
        torch.zeros((), dtype=torch.int64, device=ref.device),
    )


def _add(a: ClippedSum | None, b: ClippedSum) -> ClippedSum:
    if a is None:
        return b
    return ClippedSum(
        {k: a.grads[k] + b.grads[k] for k in a.grads},
        torch.cat([a.norms, b.norms]),
        {g: torch.cat([a.group_norms[g], b.group_norms[g]]) for g in a.group_norms},
        a.sensitivity,
        a.num_real_rows + b.num_real_rows,
    )


class DPOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer: ``step()`` replaces ``.grad`` by the private mean gradient, then steps.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's, so learning-rate
    schedulers work. Build it with :func:`make_private`.

    Attributes:
        original_optimizer: the user's optimizer.
        config: the :class:`~dpfunc.DPConfig` (clipping, σ, q, n).
        ledger: the :class:`~dpfunc.PrivacyLedger` of the steps taken.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        module: PrivateModule,
        config: DPConfig,
        key: Key,
        loss_reduction: str,
        grad_sample_mode: str,
        chunk_size: int | None,
        sampler: Any,
        budget: Any = None,
        accountant: str | None = None,
        secure: bool = False,
        world: Any = None,
    ):
        # torch.optim.Optimizer.__init__ is not called: the parameters and state are the inner optimizer's.
        self.original_optimizer = optimizer
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._module = module
        self._inner = module._module
        self.config = config
        self.key = key
        self.loss_reduction = loss_reduction
        self.grad_sample_mode = grad_sample_mode
        self.chunk_size = chunk_size
        self.accountant = accountant
        self.secure = secure
        self.world = world  # a dpfunc.distributed.World, or None for one process
        self._sampler = sampler
        self._noise_key = run_keys(key).noise
        self._secure_entropy = None
        if secure and world is not None and world.size > 1:  # rank 0's OS entropy keys every rank's secure noise
            from dpfunc.distributed import shared_entropy

            self._secure_entropy = shared_entropy(world)
        self._dp = dp_transform(config, self._noise_key, budget=budget, secure=secure,  # adaptive clipping or not
                                secure_entropy=self._secure_entropy)
        self._named = {n: p for n, p in self._inner.named_parameters() if p.requires_grad}
        if not self._named:
            raise ValueError("make_private: the module has no trainable parameters (requires_grad=True)")
        self._dp_state: DPAggregateState = self._dp.init({n: p.detach() for n, p in self._named.items()})
        self._accum: ClippedSum | None = None
        self._accum_generation = module._shared.plan.generation
        self._engines: dict[int, Any] = {}
        module._shared.recorder = self._record

    # --- the wrapped optimizer's view --------------------------------------------------------------
    @property
    def param_groups(self):  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def __repr__(self) -> str:
        return f"DPOptimizer({self.config}, inner={self.original_optimizer!r})"

    # --- privacy ----------------------------------------------------------------------------------
    @property
    def ledger(self) -> PrivacyLedger:
        return find_dp_state(self._dp_state).ledger

    @property
    def steps(self) -> int:
        """Logical (noisy) steps taken."""
        return int(find_dp_state(self._dp_state).count)

    def _clipping(self) -> Clipping:
        """The clipping of the next step (with adaptive clipping: the current bound, from the DP state)."""
        return find_dp_state(self._dp_state).clipping

    def epsilon(self, delta: float, *, method: str | None = None) -> float:
        """ε of the steps so far at ``delta``, a pure function of :attr:`ledger` (``dpfunc.accounting.epsilon``)."""
        return float(accounting.epsilon(self.ledger, delta, method=method or self.accountant))

    # --- the step ---------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def _params(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(params, constants)`` of the wrapped module, detached views (no copy)."""
        params = {n: p.detach() for n, p in self._named.items()}
        consts = {n: p.detach() for n, p in self._inner.named_parameters() if not p.requires_grad}
        consts.update({n: t.detach() for n, t in self._inner.named_buffers()})
        return params, consts

    def _engine(self, num_inputs: int):
        """The engine for a forward with ``num_inputs`` tensors (fast for one input, else vmap), cached."""
        if num_inputs in self._engines:
            return self._engines[num_inputs]
        apply_fn = module_apply_fn(self._inner)
        if self.grad_sample_mode == "fast" and num_inputs == 1:
            from dpfunc.bridge.fast import fast_engine

            engine = fast_engine(apply_fn, _output_surrogate, self.config.clipping, fallback_chunk_size=self.chunk_size)
        else:

            def loss_fn(params, buffers, *example):
                xs, cs = example[:num_inputs], example[num_inputs:]
                out = apply_fn(params, buffers, *(x.unsqueeze(0) for x in xs))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                return sum((o * c.unsqueeze(0)).sum() for o, c in zip(outs, cs))

            engine = vmap_engine(loss_fn, clipping=self.config.clipping, chunk_size=self.chunk_size, randomness="different")
        self._engines[num_inputs] = engine
        return engine

    def _record(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[Any, Any]:
        """The training forward (``PrivateModule`` calls it under the forward's dropout key).

        Fast engine: the engine's tapped forward, kept for the step — the only forward of the step.
        vmap engine: a plain forward without autograd (the step's vmap is a second one).
        """
        if self.grad_sample_mode == "fast" and len(args) == 1:
            params, consts = self._params()
            fast_pass = self._engine(1).begin(params, consts, args[0])
            return fast_pass.output, fast_pass
        with torch.no_grad():
            return module(*args), None

    # --- the step, in three named phases ----------------------------------------------------------
    def _output_gradients(self, mb: _MicroBatch) -> list[torch.Tensor]:
        """``∂ loss_sum / ∂ output`` per example: the leaves' gradients, times B for a mean-reduced loss."""
        b = mb.args[0].shape[0]
        cs = []
        for leaf in mb.outputs:
            if not leaf.is_floating_point():
                continue
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            cs.append(g * b if self.loss_reduction == "mean" else g)
        return cs

    def _clip_and_accumulate(self, pending: list[_MicroBatch]) -> None:
        """Phase 1: per micro-batch, the clipped sum of per-example gradients, added to the logical batch's."""
        for mb in pending:
            if mb.args[0].shape[0] == 0:
                continue
            cs = self._output_gradients(mb)
            devices = {p.device for p in self._named.values()} | {a.device for a in mb.args}
            with keyed_global_rng(mb.key, devices):  # a vmap (fallback) pass replays the forward's dropout
                if mb.recording is not None:
                    out = self._engine(1).clip(mb.recording, cs, clipping=self._clipping())
                else:
                    params, consts = self._params()
                    out = self._engine(len(mb.args))(params, consts, (*mb.args, *cs), None, clipping=self._clipping())
            self._accum = _add(self._accum, out.grads)

    def _add_noise(self) -> dict[str, torch.Tensor]:
        """Phase 2 (end of a logical batch): noise once, divide by the expected batch size, record the step."""
        params = {n: p.detach() for n, p in self._named.items()}
        clipped = self._accum if self._accum is not None else _zero_clipped(params, self._clipping())
        self._accum = None
        world = self.world
        if world is not None and world.size > 1:
            from dpfunc.distributed import all_reduce_clipped_sum, check_replicas

            # Each rank clipped its slice; the sum over ranks is the whole batch's clipped sum. The noise
            # is drawn after it, from the shared key, so every rank adds the SAME noise once.
            clipped = all_reduce_clipped_sum(clipped, world)
            noisy, self._dp_state = self._dp.update(clipped, self._dp_state, params)
            check_replicas(noisy, world)
            return noisy
        noisy, self._dp_state = self._dp.update(clipped, self._dp_state, params)
        return noisy

    def _inner_step(self, noisy: dict[str, torch.Tensor]) -> None:
        """Phase 3: the private mean becomes ``p.grad`` and the user's torch optimizer steps."""
        for n, p in self._named.items():
            p.grad = noisy[n].to(p.dtype)
        self.original_optimizer.step()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Clip per example and accumulate; at the end of a logical batch add noise once and step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        shared = self._module._shared
        pending, shared.pending = shared.pending, []
        if shared.plan.generation != self._accum_generation:
            self._accum, self._accum_generation = None, shared.plan.generation  # a new epoch: drop partial sums
        if not pending:
            raise RuntimeError(
                "DPOptimizer.step: no training forward is pending; run model(x) in train mode and loss.backward() "
                "before optimizer.step() (use the model returned by make_private)"
            )
        used = [mb for mb in pending if any(o.grad is not None for o in mb.outputs)]  # a forward without backward is ignored
        if not used and any(mb.args[0].shape[0] > 0 for mb in pending):
            raise RuntimeError("DPOptimizer.step: the model's output has no gradient; call loss.backward() before optimizer.step()")
        check_budget(find_dp_state(self._dp_state))  # a refused step runs no backward
        self._clip_and_accumulate(used)
        if not shared.plan.consume():
            return loss  # mid logical batch: accumulate only (Opacus' BatchMemoryManager skips the step)
        self._inner_step(self._add_noise())
        return loss

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to resume bit for bit: the torch optimizer's state, the DP state (step
        count and ledger), the config, the key, and the data/dropout counters. Plain containers only.

        Raises:
            RuntimeError: in the middle of a logical batch (save after the step that ends it).
        """
        flush_nonfinite_checks()  # a GPU run saves nothing that a pending non-finite check would refuse
        plan = self._module._shared.plan
        if self._accum is not None or plan.mid_batch:
            raise RuntimeError("DPOptimizer.state_dict: called in the middle of a logical batch; save after optimizer.step() ends it")
        position = None if self._sampler is None else self._sampler.position - plan.unconsumed
        s = find_dp_state(self._dp_state)
        adaptive = {"max_grad_norm": bound_to_plain(s.clipping)} if isinstance(self.config, AdaptiveDPConfig) else {}
        return {
            "format": "dpfunc.bridge.DPOptimizer",
            "inner": self.original_optimizer.state_dict(),
            "dp_state": {"count": int(s.count), "ledger": s.ledger.to_dict(), **adaptive},
            "config": _config_dict(self.config, self.secure),
            "key": self.key.seed,
            "forward_count": self._module._shared.forward_count,
            "sampler_position": position,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`. Refuses to discard privacy already spent by this optimizer."""
        fn = "DPOptimizer.load_state_dict"
        if not isinstance(state_dict, dict) or state_dict.get("format") != "dpfunc.bridge.DPOptimizer":
            raise ValueError(f"{fn}: not a DPOptimizer state_dict (got keys {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__})")
        if self.steps or self.ledger.total_steps:
            raise ValueError(
                f"{fn}: this optimizer has already taken {self.steps} private steps; loading would drop them from the "
                "privacy ledger. Load into a fresh make_private(...) instead."
            )
        config = state_dict["config"]
        if config != _config_dict(self.config, self.secure):
            raise ValueError(f"{fn}: the checkpoint was made with {config}, but this optimizer has {_config_dict(self.config, self.secure)}")
        dp = state_dict["dp_state"]
        if "ledger" not in dp:
            raise ValueError(f"{fn}: the checkpoint has no privacy ledger; refusing to start from an empty one")
        ledger = PrivacyLedger.from_dict(dp["ledger"])
        restored = {}
        if isinstance(self.config, AdaptiveDPConfig):  # the clip norm is part of the state
            if "max_grad_norm" not in dp:
                raise ValueError(f"{fn}: the checkpoint holds no adaptive clip norm (dp_state has {sorted(dp)}); it was not "
                                 "written by an adaptive-clipping optimizer")
            restored["clipping"] = bound_from_plain(self.config.clipping, dp["max_grad_norm"])
        self._dp_state = replace_dp_state(self._dp_state, count=int(dp["count"]), ledger=ledger, **restored)
        key = Key(int(state_dict["key"]))
        keys = run_keys(key)
        if key != self.key:
            self.key, self._noise_key = key, keys.noise
            guard = find_dp_state(self._dp_state).budget
            budget = guard.budget if guard is not None else None
            self._dp = dp_transform(self.config, self._noise_key, budget=budget, secure=self.secure,
                                    secure_entropy=self._secure_entropy)
        self.original_optimizer.load_state_dict(state_dict["inner"])
        self._module._shared.forward_count = int(state_dict["forward_count"])
        world = self.world
        self._module._shared.dropout_key = keys.dropout if world is None or world.size == 1 else keys.dropout.fold_in(world.rank)
        if self._sampler is not None and state_dict.get("sampler_position") is not None:
            self._sampler.position = int(state_dict["sampler_position"])
            if hasattr(self._sampler, "key"):
                self._sampler.key = keys.sampling


def _config_dict(config: DPConfig, secure: bool = False) -> dict[str, Any]:
    """A plain-container form of a DPConfig (for state_dict comparisons and ``weights_only`` loading);
    ``"secure": True`` only for secure mode, so state_dicts of earlier versions still compare equal."""
    clip = config.clipping
    if isinstance(config, AdaptiveDPConfig):  # the rule, not the current bound (that is in dp_state)
        return {"clipping": "AdaptiveClipping", **{k: getattr(clip, k) for k in clip.__dataclass_fields__},
                "noise_multiplier": config.noise_multiplier, "sampling_rate": config.sampling_rate,
                "num_examples": config.num_examples}
    bound = clip.max_grad_norm if not isinstance(clip.max_grad_norm, tuple) else [list(kv) for kv in clip.max_grad_norm]
    return ({"secure": True} if secure else {}) | {
        "clipping": type(clip).__name__,
        "max_grad_norm": bound,
        "per_parameter": bool(getattr(clip, "per_parameter", False)),
        "noise_multiplier": config.noise_multiplier,
        "sampling_rate": config.sampling_rate,
        "num_examples": config.num_examples,
    }


