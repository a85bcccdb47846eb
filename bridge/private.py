"""``make_private``: an ordinary torch training loop, made differentially private.

::

    model, optimizer, loader = make_private(model, optimizer, loader, key=Key(seed),
                                            noise_multiplier=1.1, max_grad_norm=1.0)
    for x, y in loader:                       # Poisson batches from the key
        loss = criterion(model(x), y)         # unchanged
        loss.backward()                       # unchanged (cheap: only d loss / d output)
        optimizer.step()                      # per-example grads → clip → noise once → torch step
        optimizer.zero_grad()
    optimizer.epsilon(delta=1e-5)

How it works (no hooks, no attributes on the user's parameters or modules):

1. :class:`PrivateModule` runs the user's module without autograd in training mode, records the
   batch, and returns the output as a fresh leaf tensor. ``loss.backward()`` therefore only computes
   ``c = ∂loss/∂output`` (one row per example) — it never back-propagates through the network.
2. ``optimizer.step()`` gives each example the surrogate loss ``ℓ_i(θ) = ⟨f(θ, x_i), s·c_i⟩``
   (``s`` = batch size for a mean-reduced loss, 1 for a sum), whose gradient ``J_iᵀ s c_i`` is exactly
   example ``i``'s gradient of the user's loss, and hands it to a core engine: :func:`dpfunc.vmap_engine`
   or ``dpfunc.bridge.fast.fast_engine``. The engine clips; :func:`dpfunc.dp_aggregate` sums,
   adds noise from ``noise_key.fold_in(step)`` once per logical batch, divides by the expected
   batch size and records the step in its ledger.
3. The private mean is written to ``p.grad`` and the user's own torch optimizer steps.

Formal guarantees:
    Each logical step is one Poisson-subsampled Gaussian mechanism with noise multiplier σ and
    sensitivity ``max_grad_norm`` (add/remove-one), provided the user's loss is a sum or mean over
    examples of terms that depend on one example each (true for ``CrossEntropyLoss``, ``MSELoss``
    … without class weights) and the model has no cross-example layers (``validate`` / ``assert_valid``
    are run). Terms of the loss that depend on parameters directly (an L2 penalty) are NOT part of the
    private gradient; use the optimizer's ``weight_decay``.

Edge cases:

    ===============================  ==============================================================
    empty Poisson batch              a forward with 0 rows; the step releases pure noise
    forward without backward         ignored (e.g. logging a batch in train mode)
    ``step()`` with nothing pending  RuntimeError (call ``model(x)`` and ``loss.backward()`` first)
    micro-batches                    noise and the torch step only at the end of a logical batch
    dropout                          per-example masks from ``dropout_key.fold_in(forward)``; the
                                     gradient pass replays the same masks (vmap "different")
    ===============================  ==============================================================
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from dpfunc.clipping import ClippedSum, Clipping, FlatClipping, PerLayerClipping
from dpfunc import accounting
from dpfunc.keys import Key, run_keys
from dpfunc.private import DPAggregateState, DPConfig, dp_aggregate
from dpfunc.step import vmap_engine
from dpfunc.accounting.ledger import PrivacyLedger
from dpfunc.bridge.functional import keyed_global_rng
from dpfunc.bridge.loader import LogicalBatchPlan, poisson_loader
from dpfunc.bridge.module import PrivateModule, _MicroBatch, _Shared
from dpfunc.bridge.validate import assert_valid

__all__ = ["PrivateModule", "DPOptimizer", "make_private", "PrivacyEngine"]

_REDUCTIONS = ("mean", "sum")
_MODES = ("fast", "vmap")


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
        a.num_examples + b.num_examples,
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
        accountant: str = "pld",
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
        self._sampler = sampler
        self._noise_key = run_keys(key).noise
        self._dp = dp_aggregate(config, self._noise_key, budget=budget)
        self._named = {n: p for n, p in self._inner.named_parameters() if p.requires_grad}
        if not self._named:
            raise ValueError("make_private: the module has no trainable parameters (requires_grad=True)")
        self._dp_state: DPAggregateState = self._dp.init({n: p.detach() for n, p in self._named.items()})
        self._accum: ClippedSum | None = None
        self._accum_generation = module._shared.plan.generation
        self._engines: dict[int, Any] = {}

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
        return self._dp_state.ledger

    @property
    def steps(self) -> int:
        """Logical (noisy) steps taken."""
        return int(self._dp_state.count)

    def epsilon(self, delta: float, *, method: str | None = None) -> float:
        """ε of the steps so far at ``delta``, a pure function of :attr:`ledger` (``dpfunc.accounting.epsilon``)."""
        return float(accounting.epsilon(self.ledger, delta, method=method or self.accountant))

    # --- the step ---------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)

    def _engine(self, num_inputs: int):
        if num_inputs in self._engines:
            return self._engines[num_inputs]
        inner = self._inner

        def apply_fn(params, buffers, *args):
            return functional_call(inner, (params, buffers), args, tie_weights=True, strict=False)

        apply_fn.module = inner
        engine = None
        if self.grad_sample_mode == "fast" and num_inputs == 1:
            try:
                from dpfunc.bridge.fast import fast_engine
            except ImportError:
                fast_engine = None
            if fast_engine is not None:

                def loss_from_output(out, *cs):
                    outs = out if isinstance(out, (tuple, list)) else (out,)
                    return sum((o * c).reshape(o.shape[0], -1).sum(1) for o, c in zip(outs, cs))

                engine = fast_engine(apply_fn, loss_from_output, self.config.clipping, fallback_chunk_size=self.chunk_size)
        if engine is None:

            def loss_fn(params, buffers, *example):
                xs, cs = example[:num_inputs], example[num_inputs:]
                out = apply_fn(params, buffers, *(x.unsqueeze(0) for x in xs))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                return sum((o * c.unsqueeze(0)).sum() for o, c in zip(outs, cs))

            engine = vmap_engine(loss_fn, clipping=self.config.clipping, chunk_size=self.chunk_size, randomness="different")
        self._engines[num_inputs] = engine
        return engine

    def _clip(self, mb: _MicroBatch) -> ClippedSum | None:
        b = mb.args[0].shape[0]
        if b == 0:
            return None
        cs = []
        for leaf in mb.outputs:
            if not leaf.is_floating_point():
                continue
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            cs.append(g * b if self.loss_reduction == "mean" else g)
        params = {n: p.detach() for n, p in self._named.items()}
        consts = {n: p.detach() for n, p in self._inner.named_parameters() if not p.requires_grad}
        consts.update({n: t.detach() for n, t in self._inner.named_buffers()})
        devices = {p.device for p in params.values()} | {a.device for a in mb.args}
        with keyed_global_rng(mb.key, devices):
            out = self._engine(len(mb.args))(params, consts, (*mb.args, *cs), None)
        return out.grads

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Clip per example, accumulate; at the end of a logical batch add noise once and step."""
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
        used = [mb for mb in pending if any(o.grad is not None for o in mb.outputs)]
        if not used and any(mb.args[0].shape[0] > 0 for mb in pending):
            raise RuntimeError("DPOptimizer.step: the model's output has no gradient; call loss.backward() before optimizer.step()")
        for mb in used:
            cs = self._clip(mb)
            if cs is not None:
                self._accum = _add(self._accum, cs)
        if not shared.plan.consume():
            return loss  # mid logical batch: accumulate only (Opacus' BatchMemoryManager skips the step)
        params = {n: p.detach() for n, p in self._named.items()}
        clipped = self._accum if self._accum is not None else _zero_clipped(params, self.config.clipping)
        self._accum = None
        noisy, self._dp_state = self._dp.update(clipped, self._dp_state, params)
        for n, p in self._named.items():
            p.grad = noisy[n].to(p.dtype)
        self.original_optimizer.step()
        return loss

    # --- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Everything needed to resume bit for bit: the torch optimizer's state, the DP state (step
        count and ledger), the config, the key, and the data/dropout counters. Plain containers only.

        Raises:
            RuntimeError: in the middle of a logical batch (save after the step that ends it).
        """
        plan = self._module._shared.plan
        if self._accum is not None or plan.mid_batch:
            raise RuntimeError("DPOptimizer.state_dict: called in the middle of a logical batch; save after optimizer.step() ends it")
        position = None if self._sampler is None else self._sampler.position - plan.unconsumed
        s = self._dp_state
        return {
            "format": "dpfunc.bridge.DPOptimizer",
            "inner": self.original_optimizer.state_dict(),
            "dp_state": {"count": int(s.count), "ledger": s.ledger.to_dict()},
            "config": _config_dict(self.config),
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
        if config != _config_dict(self.config):
            raise ValueError(f"{fn}: the checkpoint was made with {config}, but this optimizer has {_config_dict(self.config)}")
        dp = state_dict["dp_state"]
        if "ledger" not in dp:
            raise ValueError(f"{fn}: the checkpoint has no privacy ledger; refusing to start from an empty one")
        ledger = PrivacyLedger.from_dict(dp["ledger"])
        self._dp_state = self._dp_state._replace(count=int(dp["count"]), ledger=ledger)
        key = Key(int(state_dict["key"]))
        keys = run_keys(key)
        if key != self.key:
            self.key, self._noise_key = key, keys.noise
            budget = self._dp_state.budget.budget if self._dp_state.budget is not None else None
            self._dp = dp_aggregate(self.config, self._noise_key, budget=budget)
        self.original_optimizer.load_state_dict(state_dict["inner"])
        self._module._shared.forward_count = int(state_dict["forward_count"])
        self._module._shared.dropout_key = keys.dropout
        if self._sampler is not None and state_dict.get("sampler_position") is not None:
            self._sampler.position = int(state_dict["sampler_position"])
            if hasattr(self._sampler, "key"):
                self._sampler.key = keys.sampling


def _config_dict(config: DPConfig) -> dict[str, Any]:
    """A plain-container form of a DPConfig (for state_dict comparisons and ``weights_only`` loading)."""
    clip = config.clipping
    bound = clip.max_grad_norm if not isinstance(clip.max_grad_norm, tuple) else [list(kv) for kv in clip.max_grad_norm]
    return {
        "clipping": type(clip).__name__,
        "max_grad_norm": bound,
        "per_parameter": bool(getattr(clip, "per_parameter", False)),
        "noise_multiplier": config.noise_multiplier,
        "sampling_rate": config.sampling_rate,
        "num_examples": config.num_examples,
    }


def _clipping(fn: str, clipping: Any, max_grad_norm: Any) -> Clipping:
    if isinstance(clipping, (FlatClipping, PerLayerClipping)):
        return clipping
    if clipping == "flat":
        return FlatClipping(max_grad_norm)
    if clipping == "per_layer":
        return PerLayerClipping(max_grad_norm)
    raise ValueError(f"{fn}: clipping must be 'flat', 'per_layer' or a FlatClipping/PerLayerClipping, got {clipping!r}")


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    key: Key,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: int | None = None,
    criterion: nn.Module | None = None,
    loss_reduction: str | None = None,
    poisson_sampling: bool = True,
    clipping: str | Clipping = "flat",
    grad_sample_mode: str = "fast",
    max_physical_batch_size: int | None = None,
    chunk_size: int | None = None,
    accountant: str = "pld",
    budget: Any = None,
    validate: bool = True,
) -> tuple[PrivateModule, DPOptimizer, DataLoader]:
    """Make an ordinary torch training setup differentially private (see the module docstring).

    Args:
        module: the model; its parameters are trained in place by the user's optimizer (as before).
        optimizer: the user's torch optimizer over ``module``'s parameters.
        data_loader: a ``DataLoader`` over a map-style dataset.
        key: the run's secret key (``Key(seed)``); noise, Poisson batches and dropout masks derive from
            :func:`~dpfunc.keys.run_keys` (``.noise``, ``.sampling``, ``.dropout``). Keep the seed secret: whoever knows it can subtract the noise.
        max_grad_norm: the clipping bound ``C``.
        noise_multiplier: σ; or give ``target_epsilon``, ``target_delta`` and ``epochs`` to calibrate it.
        criterion: optional, for its ``reduction`` (``"mean"`` or ``"sum"``); default reduction "mean".
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss used in ``backward`` reduces over the batch.
        poisson_sampling: True (default): Poisson batches with ``q = 1/len(data_loader)``. False keeps
            the loader's own batches (the accounting then assumes sampling that did not happen).
        clipping: ``"flat"``, ``"per_layer"`` (``C`` split equally over layers) or a Clipping object.
        grad_sample_mode: ``"fast"`` (ghost norms; layers without a rule fall back to vmap) or ``"vmap"``.
        max_physical_batch_size: split logical batches into micro-batches of at most this size; noise
            is added once per logical batch.
        chunk_size: vmap chunking (memory bound of the vmap path). With dropout, chunked draws no
            longer replay the forward's masks (the gradient is still clipped, so privacy holds).
        accountant: method of ``dpfunc.accounting`` for ``epsilon`` and calibration (``"pld"``, ``"rdp"``).
        budget: optional ``dpfunc.accounting.PrivacyBudget`` enforced before each step.
        validate: run :func:`~dpfunc.bridge.assert_valid` on the module (refuses BatchNorm etc.).

    Returns:
        ``(module, optimizer, data_loader)``: a :class:`PrivateModule`, a :class:`DPOptimizer` (with
        ``.ledger``, ``.epsilon(delta)``, ``.state_dict()``), and the Poisson ``DataLoader``.
    """
    fn = "make_private"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, PrivateModule):
        raise ValueError(f"{fn}: the module is already private (a PrivateModule)")
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DPOptimizer):
        raise TypeError(f"{fn}: optimizer must be a (non-private) torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.Key (e.g. Key(seed)), got {type(key).__name__}")
    if grad_sample_mode not in _MODES:
        raise ValueError(f"{fn}: grad_sample_mode must be one of {_MODES}, got {grad_sample_mode!r}")
    reduction = loss_reduction
    if criterion is not None and getattr(criterion, "reduction", None) is not None:
        if reduction is not None and reduction != criterion.reduction:
            raise ValueError(f"{fn}: loss_reduction={reduction!r} disagrees with criterion.reduction={criterion.reduction!r}")
        reduction = criterion.reduction
    reduction = reduction or "mean"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: the loss must reduce by 'mean' or 'sum' over the batch, got {reduction!r}")
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in trainable:
                raise ValueError(f"{fn}: the optimizer holds a parameter {tuple(p.shape)} that is not a trainable parameter "
                                 f"of the module. If you called `model = fix(model)`: fix returns a NEW module, so build "
                                 f"the optimizer after it, from the new module's parameters (`optimizer = "
                                 f"torch.optim.SGD(model.parameters(), ...)`)")
    if validate:
        assert_valid(module)
    clip = _clipping(fn, clipping, max_grad_norm)

    keys = run_keys(key)
    sample_key, dropout_key = keys.sampling, keys.dropout
    plan = LogicalBatchPlan()
    loader, q, steps_per_epoch = poisson_loader(
        data_loader, key=sample_key, poisson_sampling=poisson_sampling, max_physical_batch_size=max_physical_batch_size, plan=plan
    )
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(f"{fn}: give exactly one of noise_multiplier and target_epsilon (with target_delta and epochs)")
    if target_epsilon is not None:
        if target_delta is None or epochs is None:
            raise ValueError(f"{fn}: target_epsilon needs target_delta and epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"{fn}: epochs must be an int >= 1, got {epochs!r}")
        noise_multiplier = float(accounting.noise_multiplier_for(target_epsilon, target_delta, q, epochs * steps_per_epoch, method=accountant))
    config = DPConfig(clip, noise_multiplier, q, len(data_loader.dataset))
    shared = _Shared(dropout_key, plan)
    private_module = PrivateModule(module, shared)
    private_module.train(module.training)
    dp_optimizer = DPOptimizer(
        optimizer,
        module=private_module,
        config=config,
        key=key,
        loss_reduction=reduction,
        grad_sample_mode=grad_sample_mode,
        chunk_size=chunk_size,
        sampler=loader.batch_sampler if poisson_sampling else None,
        budget=budget,
        accountant=accountant,
    )
    return private_module, dp_optimizer, loader


class PrivacyEngine:
    """Opacus-shaped front door: ``PrivacyEngine(key=...).make_private(...)`` and ``get_epsilon(delta)``.

    Args:
        key: the run's secret key (required: dpfunc never draws a hidden seed).
        accountant: ``"pld"`` (default) or ``"rdp"``.
    """

    def __init__(self, *, key: Key, accountant: str = "pld"):
        if not isinstance(key, Key):
            raise TypeError(f"PrivacyEngine: key must be a dpfunc.Key, got {type(key).__name__}")
        self.key = key
        self.accountant = accountant
        self.optimizer: DPOptimizer | None = None

    def make_private(self, *, module, optimizer, data_loader, noise_multiplier, max_grad_norm, **kwargs):
        """As Opacus' ``PrivacyEngine.make_private``; returns ``(module, optimizer, data_loader)``."""
        return self._make(module, optimizer, data_loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, **kwargs)

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon, target_delta, epochs, max_grad_norm, **kwargs):
        """As Opacus' ``make_private_with_epsilon``: σ calibrated so that ``epochs`` epochs spend ``target_epsilon``."""
        return self._make(
            module, optimizer, data_loader, target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs,
            max_grad_norm=max_grad_norm, **kwargs,
        )

    def _make(self, module, optimizer, data_loader, **kwargs):
        kwargs.pop("batch_first", None)  # Opacus argument without meaning here (vmap handles any layout)
        m, o, d = make_private(module, optimizer, data_loader, key=self.key, accountant=self.accountant, **kwargs)
        self.optimizer = o
        return m, o, d

    def get_epsilon(self, delta: float) -> float:
        if self.optimizer is None:
            raise RuntimeError("PrivacyEngine.get_epsilon: call make_private first")
        return self.optimizer.epsilon(delta)

    @property
    def ledger(self) -> PrivacyLedger:
        if self.optimizer is None:
            return PrivacyLedger()
        return self.optimizer.ledger
