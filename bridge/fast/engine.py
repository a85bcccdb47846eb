"""``fast_engine``: per-example clipping without per-example gradients (ghost norms + book-keeping).

One forward and ONE backward of ``Σ_i loss_i`` give everything:

1. The forward runs ``functional_call(module, (params, buffers), x)`` with forward hooks on the
   supported layers (registered for the forward only). Each hook records the layer's input ``a`` and
   its output in a :class:`_CallRecord`. The fast-path parameters enter as fresh leaves that require
   grad (detached aliases: the caller's tensors are untouched), so every recorded output is in the graph.
2. ONE ``torch.autograd.grad(Σ_i loss_i, [outputs…])`` runs the backward and returns
   ``g = ∂Σloss/∂output`` for every recorded output — autograd computes only what leads to them, never
   a parameter gradient. Since example ``i`` only influences row ``i``, ``g[i]`` is example ``i``'s
   output gradient. The layer's rule (:mod:`.rules`) turns ``(a, g)`` into per-example squared norms
   and keeps either the small per-example gradient or ``(a, g)``. A rule may replace the layer's
   backward by a tap of its own (an autograd node that also takes a 0-d *anchor* leaf, which the
   backward asks for too) that hands ``g`` over as the backward passes it (GroupNorm's fused kernel).
3. Parameters of layers without a rule (any custom module) get per-example gradients by
   ``vmap(grad)`` over the model, with respect to those parameters only (mixed engine).
4. Norms per clipping group → clip factors ``c_i`` (the core's :func:`~dpfunc.clipping.clip_factors`)
   → clipped sums ``Σ_i c_i ∇θ loss_i`` from what the rules kept (e.g. ``(c·g)ᵀ a`` for Linear).

The forward and the backward are two phases of a :class:`FastPass`, so that the bridge can run the
forward inside ``model(x)`` (the user's one forward) and the backward inside ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from dpfunc.adaptive_clipping import AdaptiveClipping, call_clipping
from dpfunc.clipping import ClippedSum, Clipping, check_finite_norms, clip_factors, group_norms
from dpfunc.step import EngineOutput, GradEngine

from dpfunc.bridge.functional import module_apply_fn
from dpfunc.bridge.fast.rules import Call, LayerGrads, Rule, rule_for
from dpfunc.bridge.fast.rules._common import _weighted
from dpfunc.bridge.fast.rules.attention import AttentionTaps

__all__ = ["fast_engine", "FastPass"]

_FN = "fast_engine"


@dataclass(eq=False)
class _CallRecord:
    """One forward call of a supported layer: what its rule needs, filled in two phases.

    The forward hook sets ``x`` (input), ``weight`` and ``saved`` (what ``Rule.capture`` took), and
    ``output``, the layer's output whose gradient the backward returns (None when the rule's own tap
    hands the gradient over in the backward); :meth:`receive` sets ``g`` (gradient at the output).
    ``on_grad`` lets a layer called once reduce its rule as soon as its gradient arrives.
    """

    x: Any
    weight: torch.Tensor | None
    saved: object
    output: torch.Tensor | None = None
    g: torch.Tensor | None = None
    on_grad: Callable[[_CallRecord], None] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None  # e.g. seq-first -> batch-first

    def receive(self, g: torch.Tensor) -> None:
        self.g = g if self.transform is None else self.transform(g)
        if self.on_grad is not None:
            self.on_grad(self)

    def call(self) -> Call:
        # Under autocast (``dpfunc.devices.mixed_precision``) the tapped input and output gradient are
        # bf16/fp16 while the parameter is float32: the rules' norms and sums run in the parameter's
        # dtype, so clipping and the clipped sum are float32 whatever the forward's precision.
        dtype = self.weight.dtype if isinstance(self.weight, torch.Tensor) and self.weight.is_floating_point() else None
        saved = tuple(_widen(s, dtype) for s in self.saved) if isinstance(self.saved, tuple) else _widen(self.saved, dtype)
        return Call(_widen(self.x, dtype), _widen(self.g, dtype), self.weight, saved)


def _values(t: Any) -> Any:
    """``t`` without autograd history (the rules need values only: a kept tensor that still carried its
    graph would chain every step's graph into the clipped sums and the next parameters)."""
    return t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t


def _widen(t: Any, dtype: torch.dtype | None) -> Any:
    """``t`` in ``dtype`` when it is a floating tensor narrower than ``dtype`` (else ``t`` itself)."""
    if dtype is None or not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype) if torch.finfo(t.dtype).bits < torch.finfo(dtype).bits else t


class _Layer:
    """A supported module of a routing: its rule and which of its parameters take the fast path."""

    __slots__ = ("module", "rule", "names", "attrs", "clone_output")

    def __init__(self, module: nn.Module, rule: Rule, names: dict[str, str]):
        self.module, self.rule = module, rule
        self.names = names  # attr ("weight" / "bias" / …) -> params key
        self.attrs = frozenset(names)
        self.clone_output = True  # until a forward has shown that nothing edits the output in place


class _Routing:
    """Which parameters take which path (a layer rule or vmap), computed once per (module, params keys).

    The first forward of a routing *verifies* it: a ``TorchFunctionMode`` finds fast-path parameters
    read outside their own layer's forward (they move to the vmap path, and that forward is run
    again), and every tap output is a copy whose version counter shows whether the model modifies
    it in place. Layers whose output is never modified in place get a zero-copy view from then on.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]):
        wanted = set(names)
        canonical: dict[int, str] = {}
        for name, p in module.named_parameters(remove_duplicate=True):
            canonical[id(p)] = name
        users: dict[str, int] = {}
        for _, m in module.named_modules(remove_duplicate=False):
            for p in m._parameters.values():
                if p is not None and id(p) in canonical:
                    users[canonical[id(p)]] = users.get(canonical[id(p)], 0) + 1
        layers, fast = [], set()
        for _, m in module.named_modules(remove_duplicate=True):  # parents first: a rule may claim a child's
            rule = rule_for(m)
            if rule is None:
                continue
            own = {}
            for attr, p in rule.owns(m).items():
                if p is None or id(p) not in canonical:
                    continue
                name = canonical[id(p)]
                if name in wanted and name not in fast and users[name] == 1:  # tied parameters take the vmap path
                    own[attr] = name
            layers.append(_Layer(m, rule, own))
            fast.update(own.values())
        self.layers = layers
        self.names = list(names)
        self.verified = False
        self._plan()

    def _plan(self) -> None:
        """The per-call decisions, made once: the layers to hook and the parameters of each path."""
        self.active = [layer for layer in self.layers if layer.attrs]  # layers with a fast-path parameter
        self.fast_names = [n for layer in self.active for n in layer.names.values()]
        fast = set(self.fast_names)
        self.fallback = [n for n in self.names if n not in fast]

    def demote(self, foreign: set[str]) -> None:
        """Parameters read outside their own layer's forward go to the vmap path."""
        for layer in self.layers:
            layer.names = {a: n for a, n in layer.names.items() if n not in foreign}
            layer.attrs = frozenset(layer.names)
        self._plan()


class _ForeignUse(TorchFunctionMode):
    """Finds fast-path parameters that reach a torch function outside their own layer's forward
    (e.g. a custom module reading ``fc.weight`` directly): those need the vmap path."""

    def __init__(self, owner: dict[int, tuple[nn.Module, str]]):
        super().__init__()
        self.owner, self.active, self.foreign = owner, [], set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            hit = self.owner.get(id(t)) if isinstance(t, torch.Tensor) else None
            if hit is not None and (not self.active or self.active[-1] is not hit[0]):
                self.foreign.add(hit[1])
        return func(*args, **kwargs)


@dataclass(frozen=True)
class _Settings:
    """The engine's fixed choices (from :func:`fast_engine`'s arguments)."""

    ghost: bool | None
    chunk: int | None
    views: int | None


class FastPass:
    """One batch through the fast engine, in two phases: :meth:`forward` then :meth:`finish`.

    ``engine(params, buffers, (x, *targets), mask)`` is ``FastPass(...).forward(x)`` followed by
    ``finish(targets)``. The bridge calls :meth:`forward` in ``model(x)`` — the user's only forward
    — and :meth:`finish` in ``optimizer.step()`` with the output gradient as the target.
    """

    def __init__(self, routing: _Routing, apply_fn, loss_from_output, clipping: Clipping, settings: _Settings, params, buffers):
        self.routing, self.apply_fn, self.loss_from_output = routing, apply_fn, loss_from_output
        self.clipping, self.settings = clipping, settings
        self.params = {k: _values(v) for k, v in params.items()}
        self.buffers = buffers
        self.anchor = torch.zeros((), requires_grad=True)
        self.records: dict[_Layer, list[_CallRecord]] = {}
        self.results: dict[_Layer, LayerGrads] = {}
        self.x: torch.Tensor | None = None
        self.output: Any = None

    # --- phase 1: the tapped forward -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Any:
        """Run the model on ``x`` (``(n, ...)``, or ``(n, K, ...)`` with K views) with taps; returns its output."""
        self.x = x
        if self.settings.views is not None:  # example-major rows: view k of example i is row i·K + k
            x = x.flatten(0, 1)
        if x.shape[0] == 0:
            with torch.no_grad():
                self.output = self.apply_fn(self.params, self.buffers, x)
            return self.output
        while True:
            verifying = not self.routing.verified
            out = self._tapped_forward(x, verifying)
            if out is not None:
                self.output = out
                return out

    def _tapped_forward(self, x: torch.Tensor, verifying: bool) -> Any:
        """One forward with hooks; None when verification moved parameters and it must be repeated."""
        routing = self.routing
        layers = routing.active
        self.records = {layer: [] for layer in layers}
        self.results = {}
        # The fast-path parameters enter as fresh leaves that require grad, so that every tapped
        # output is in the graph; the backward asks for the outputs' gradients only, never theirs.
        leaves = dict(self.params)
        for n in routing.fast_names:
            leaves[n] = leaves[n].detach().requires_grad_()
        watch, handles, taps = None, [], []
        if verifying:
            watch = _ForeignUse({id(leaves[n]): (layer.module, n) for layer in layers for n in layer.names.values()})
            for layer in layers:
                handles.append(layer.module.register_forward_pre_hook(lambda m, a: watch.active.append(m)))
                handles.append(layer.module.register_forward_hook(lambda m, a, o: watch.active.pop() and None, always_call=True))
        attention = AttentionTaps(self, layers)
        try:
            for layer in layers:
                if not attention.handles(layer):
                    handles.append(layer.module.register_forward_hook(self._hook(layer, verifying, taps), prepend=True, with_kwargs=True))
            with torch.enable_grad(), (watch if watch is not None else contextlib.nullcontext()), attention:
                out = self.apply_fn(leaves, self.buffers, x)
        finally:
            for h in handles:
                h.remove()
        if verifying:
            routing.verified = True
            for layer, tapped in taps:  # explicit in-place detection: did anything modify the copy?
                layer.clone_output = layer.clone_output and tapped._version > 0
            if watch.foreign:
                routing.demote(watch.foreign)
                return None
        return out

    def _hook(self, layer: _Layer, verifying: bool, taps: list):
        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            inp = args[0] if args else next(iter(kwargs.values()))
            name = layer.names.get("weight")  # a fast-path weight: its values without the forward's leaf
            weight = self.params[name] if name is not None else getattr(module, "weight", None)
            return self.tap(layer, inp, output, weight, verifying, taps)

        return hook

    def tap(self, layer: _Layer, inp: Any, output: torch.Tensor, weight: torch.Tensor | None, verifying: bool = False, taps: list | None = None,
            capture: bool = True) -> torch.Tensor:
        """Record one call of ``layer`` and return the output to hand on: ``output`` itself, a copy of it (the
        first forward, and layers whose output the model modifies in place), or the rule's own tap."""
        # Values only (see _values): input, weight and what the rule captured.
        saved = layer.rule.capture(layer.module, output) if capture else None
        saved = tuple(_values(s) for s in saved) if isinstance(saved, tuple) else saved
        record = _CallRecord(_values(inp), _values(weight), saved)
        calls = self.records[layer]
        calls.append(record)
        if len(calls) == 1:
            record.on_grad = lambda r, layer=layer: self._reduce_single(layer, r)
        else:
            calls[0].on_grad = None  # several calls: reduce after the backward
        clone = verifying or layer.clone_output
        tapped = None
        if layer.rule.tap is not None and isinstance(inp, torch.Tensor):
            tapped = layer.rule.tap(layer.module, inp, output, record, clone, self.anchor)
        if tapped is None:  # the backward returns the gradient at `output`; an in-place edit must hit a copy
            record.output = output
            tapped = output.clone() if clone else output
        if verifying and taps is not None:
            taps.append((layer, tapped))
        return tapped

    def _reduce_single(self, layer: _Layer, record: _CallRecord) -> None:
        """A layer called once is reduced in the backward, as soon as its output gradient arrives."""
        self.results[layer] = layer.rule.grads(layer.module, _calls([record], self.settings.views), layer.attrs, self.settings.ghost)
        self.records[layer] = []

    # --- phase 2: backward, norms, clipped sums ---------------------------------------------------
    def finish(self, targets: Sequence[Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, Callable]:
        """Backward of ``Σ_i loss_from_output(output, *targets)_i``; returns ``(sq, losses, clip_sums)``
        where ``sq`` holds the ``(n,)`` squared per-example norms per parameter name, ``losses`` the
        ``(n,)`` per-example losses and ``clip_sums(factors)`` the clipped sums per parameter name."""
        views, n = self.settings.views, self.x.shape[0]
        ref = next(iter(self.params.values()))
        if n == 0:
            self.output = None
            return {}, ref.new_zeros(0, dtype=_norm_dtype(ref)), lambda factors: {}
        per_row = targets
        if views is not None:
            per_row = tuple(t.repeat_interleave(views, 0) if isinstance(t, torch.Tensor) and t.dim() else t for t in targets)
        with torch.enable_grad():
            losses = self.loss_from_output(self.output, *per_row)
            rows = n * (views or 1)
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (rows,):
                raise ValueError(
                    f"{_FN}: loss_from_output must return per-example losses of shape ({rows},), got "
                    f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}; "
                    "use reduction='none'"
                )
            if views is not None:
                losses = losses.view(n, views).mean(1)
            tapped, grads = [], []
            if losses.requires_grad:
                # ONE backward: the gradients at the plain-tapped outputs come back together; rules with a tap
                # of their own receive theirs inside it (the anchor, their input, makes sure those run)
                tapped = [r for records in self.records.values() for r in records if r.output is not None]
                grads = torch.autograd.grad(losses.sum(), [r.output for r in tapped] + [self.anchor], allow_unused=True)
        for record, g in zip(tapped, grads):  # (the rules run without autograd, as inside the backward)
            record.output = None
            if g is not None:
                record.receive(g)
        losses = losses.detach()
        self.output = None  # the graph is spent
        for layer, records in self.records.items():
            if layer not in self.results:
                calls = _calls([r for r in records if r.g is not None], views)
                if calls:
                    self.results[layer] = layer.rule.grads(layer.module, calls, layer.attrs, self.settings.ghost)
        self.records = {}
        results = list(self.results.items())
        self.results = {}
        sq: dict[str, torch.Tensor] = {}
        for layer, res in results:
            for attr, s in res.sq.items():
                name = layer.names[attr]
                sq[name] = sq[name] + s if name in sq else s
        fallback_pe = {}
        if self.routing.fallback:
            fallback_pe = _vmap_grads(self.routing.fallback, self.apply_fn, self.loss_from_output, self.params, self.buffers,
                                      self.x, targets, self.settings)
            for name, pe in fallback_pe.items():
                sq[name] = pe.reshape(n, -1).square().sum(1)
        params = self.params

        def clip_sums(factors):
            out = {}
            for layer, res in results:
                local = res.clipped({attr: factors[name] for attr, name in layer.names.items()})
                for attr, v in local.items():
                    name = layer.names[attr]
                    out[name] = out[name] + v if name in out else v
            for name, pe in fallback_pe.items():
                out[name] = _weighted(factors[name], pe)
            return {k: v if v.dtype == params[k].dtype else v.to(params[k].dtype) for k, v in out.items()}

        return sq, losses, clip_sums


def _norm_dtype(ref: torch.Tensor) -> torch.dtype:
    return ref.dtype if ref.is_floating_point() else torch.get_default_dtype()


def _calls(records: Sequence[_CallRecord], views: int | None) -> list[Call]:
    """The recorded calls as rule inputs. With K views, a call on the ``B·K`` rows (example-major) is K
    calls on B rows — view k of every example — so a rule's sum over calls is the sum over views."""
    calls = [r.call() for r in records]
    if views is None or views == 1:  # rows are examples
        return calls

    def pick(t, k):
        return t.unflatten(0, (-1, views)).select(1, k) if isinstance(t, torch.Tensor) and t.dim() else t

    def view_k(c: Call, k: int) -> Call:
        saved = tuple(pick(s, k) for s in c.saved) if isinstance(c.saved, tuple) else c.saved
        return Call(pick(c.x, k), pick(c.g, k), c.weight, saved)

    return [view_k(c, k) for c in calls for k in range(views)]


def _vmap_grads(names, apply_fn, loss_from_output, params, buffers, x, targets, settings: _Settings):
    """Per-example gradients of the parameters ``names`` only, by ``vmap(grad)`` (the oracle's method)."""
    views = settings.views
    fixed = {k: v for k, v in params.items() if k not in names}
    own = {k: params[k] for k in names}

    def loss(p, xi, *ti):
        if views is None:
            out = apply_fn({**fixed, **p}, buffers, xi.unsqueeze(0))
            return loss_from_output(out, *(t.unsqueeze(0) for t in ti))[0]
        out = apply_fn({**fixed, **p}, buffers, xi)  # xi: (K, ...), one example's views
        return loss_from_output(out, *(t.unsqueeze(0).expand(views, *t.shape) for t in ti)).mean()

    dims = (None, 0) + tuple(0 if isinstance(t, torch.Tensor) else None for t in targets)
    with torch.enable_grad():
        return vmap(grad(loss), in_dims=dims, chunk_size=settings.chunk)(own, x, *targets)


def fast_engine(
    model: nn.Module | Callable[..., Any],
    loss_from_output: Callable[..., torch.Tensor],
    clipping: Clipping,
    *,
    ghost_norm: bool | None = None,
    fallback_chunk_size: int | None = None,
    views_per_example: int | None = None,
) -> GradEngine:
    """A :class:`~dpfunc.GradEngine` that clips per example without materialising per-example gradients.

    Returns exactly what ``vmap_engine(loss_fn, clipping=clipping)`` returns — per-example norms,
    per-group norms, the clipped sum, its sensitivity and the example count — for
    ``loss_fn(params, buffers, x, *targets) = loss_from_output(model(x[None]), *targets[None])[0]``,
    at about the cost of one ordinary training step, and without reading anything back to the host.

    Args:
        model: an ``nn.Module``, or an ``apply_fn`` from :func:`~dpfunc.bridge.functionalize` (it carries
            ``apply_fn.module``). The module is never mutated; hooks live only during a forward.
        loss_from_output: ``loss_from_output(output, *targets) -> (B,)`` per-example losses, e.g.
            ``lambda out, y: F.cross_entropy(out, y, reduction="none")``. Row ``i`` must depend on
            example ``i`` only (no batch statistics: no BatchNorm in training mode).
        clipping: :class:`~dpfunc.FlatClipping` or :class:`~dpfunc.PerLayerClipping`; or an
            :class:`~dpfunc.AdaptiveClipping`, and then every call passes the current bound as
            ``clipping=`` (:func:`~dpfunc.make_step` does; a per-call ``clipping=`` overrides a fixed one too).
        ghost_norm: per Linear-on-sequences / conv / Embedding layer, ``None`` chooses ghost norm or
            instantiation by a cost model from shapes alone (ghost iff ``T·(d_in + d_out) < d_in·d_out``,
            see :mod:`dpfunc.bridge.fast.rules.linear`; convs also weigh the pixel-Gram ghost norm, see
            :mod:`dpfunc.bridge.fast.rules.conv`); ``True`` / ``False`` force one (for tests and tuning).
        fallback_chunk_size: vmap chunk size for parameters of layers without a rule.
        views_per_example: ``None`` (the input is ``(B, ...)``) or ``K >= 1``: the input is ``(B, K, ...)``,
            K augmented views of each example (augmentation multiplicity, De et al. 2022; see
            :func:`dpfunc.data.augment_views`), and targets stay ``(B, ...)``: example ``i``'s loss is the
            mean over its views and its gradient — the mean of its view gradients — is clipped as one,
            as ``vmap_engine`` does with :func:`dpfunc.data.multiplicity_loss`. The sensitivity stays C.

    Returns:
        ``engine(params, buffers, batch, mask) -> EngineOutput(ClippedSum, losses)`` with
        ``batch = (x, *targets)``, leading dim ``B``; ``mask`` an optional ``(B,)`` of real rows
        (padding rows are gathered out and not computed at all; their norms, losses and
        contributions are 0). ``engine.begin(params, buffers, x)`` returns the :class:`FastPass` of
        the two-phase form, and ``engine.clip(pass_, targets)`` its :class:`~dpfunc.EngineOutput`.

    Supported layers (:mod:`dpfunc.bridge.fast.rules`): ``Linear`` (any leading dims),
    ``Conv1d``/``Conv2d`` (stride, padding incl. modes and 'same', dilation, groups), ``Embedding``
    (``padding_idx``), ``LayerNorm``, ``GroupNorm``, ``RMSNorm``, ``MultiheadAttention`` (its
    projections are tapped). Parameters elsewhere (custom modules, tied weights, parametrizations)
    are handled by ``vmap`` — correct, at vmap's cost for them.

    A parameter of a supported layer that the model also reads outside that layer's forward is
    detected on the first call (a ``TorchFunctionMode`` watches that forward) and moved to the vmap
    path. A model that modifies a layer's output in place is detected on the first call too (by the
    version counter of a copied output) and that layer's output stays a copy. An engine caches its
    routing per parameter-name set and is not meant to be called from several threads at once.

    Raises:
        ValueError: non-finite per-example gradient norms of real examples (as the core does, see
            :func:`~dpfunc.clipping.check_finite_norms`), a loss of the wrong shape, or a mask of the
            wrong shape.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> apply_fn, params, buffers = dpfunc.bridge.functionalize(model)
        >>> engine = fast_engine(apply_fn, lambda out, y: F.cross_entropy(out, y, reduction="none"), FlatClipping(1.0))
        >>> out = engine(params, buffers, (torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])), None)
        >>> out.grads.grads["2.weight"].shape, out.losses.shape
        (torch.Size([2, 4]), torch.Size([5]))
    """
    if isinstance(model, nn.Module):
        module, apply_fn = model, module_apply_fn(model)
    elif callable(model) and isinstance(getattr(model, "module", None), nn.Module):
        module, apply_fn = model.module, model
    else:
        raise TypeError(
            f"{_FN}: model must be an nn.Module or an apply_fn from dpfunc.bridge.functionalize (with .module), "
            f"got {type(model).__name__}"
        )
    if not callable(loss_from_output):
        raise TypeError(f"{_FN}: loss_from_output must be callable (output, *targets) -> (B,), got {loss_from_output!r}")
    if not (hasattr(clipping, "group_bounds") and hasattr(clipping, "group_of")) and not isinstance(clipping, AdaptiveClipping):
        raise TypeError(f"{_FN}: clipping must be FlatClipping, PerLayerClipping or AdaptiveClipping, got {clipping!r}")
    own = clipping
    if ghost_norm not in (None, True, False):
        raise ValueError(f"{_FN}: ghost_norm must be None (cost model), True or False, got {ghost_norm!r}")
    views = views_per_example
    if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1):
        raise ValueError(f"{_FN}: views_per_example must be None or an int >= 1, got {views!r}")
    settings = _Settings(ghost_norm, fallback_chunk_size, views)
    routings: dict[tuple[str, ...], _Routing] = {}

    def begin(params, buffers, x) -> FastPass:
        names = tuple(params)
        if not names:
            raise ValueError(f"{_FN}: params is empty; pass the dict of parameters to differentiate")
        if names not in routings:
            routings[names] = _Routing(module, names)
        fast_pass = FastPass(routings[names], apply_fn, loss_from_output, clipping, settings, params, buffers)
        fast_pass.forward(x)
        return fast_pass

    @torch.no_grad()  # outputs carry no graph; the one backward inside enables grad for itself
    def clip(fast_pass: FastPass, targets, mask=None, keep=None, b=None, *, clipping=None) -> EngineOutput:
        clipping = call_clipping(_FN, own, clipping)  # adaptive clipping: the current bound, given per call
        names = fast_pass.routing.names
        ref = next(iter(fast_pass.params.values()))
        n = fast_pass.x.shape[0]
        b = n if b is None else b
        sq, losses, clip_sums = fast_pass.finish(tuple(targets))
        dtype = _norm_dtype(ref)
        like = next(iter(sq.values())) if sq else ref.new_zeros(n, dtype=dtype)  # (n,): dtype and device of a missing entry
        if like.dtype != dtype:
            like = like.to(dtype)
        norms, groups = group_norms({k: v if v.dtype == dtype else v.to(dtype) for k, v in sq.items()}, clipping, names, like)

        def full(t):
            return t if keep is None else t.new_zeros((b, *t.shape[1:])).index_copy_(0, keep, t)

        full_norms = full(norms)
        check_finite_norms(_FN, full_norms, mask)
        factors = clip_factors(groups, clipping.group_bounds(names))
        grads = clip_sums({name: factors[clipping.group_of(name)] for name in names})
        grads = {name: grads[name] if name in grads else torch.zeros_like(fast_pass.params[name]) for name in names}
        count = mask.to(torch.int64).sum() if mask is not None else torch.tensor(b)
        out = ClippedSum(grads, full_norms, {g: full(v) for g, v in groups.items()}, clipping.sensitivity(names), count)
        return EngineOutput(out, full(losses.to(dtype) if not losses.is_floating_point() else losses))

    @torch.no_grad()
    def engine(params, buffers, batch, mask, *, clipping=None):
        batch = tuple(batch)
        call_clipping(_FN, own, clipping)  # refuse a missing adaptive bound before any work
        if not batch or not isinstance(batch[0], torch.Tensor):
            raise ValueError(f"{_FN}: batch must be a non-empty tuple (x, *targets) of tensors")
        b = batch[0].shape[0]
        if views is not None and (batch[0].dim() < 2 or batch[0].shape[1] != views):
            raise ValueError(
                f"{_FN}: with views_per_example={views} the input must have shape (B, {views}, ...), "
                f"got {tuple(batch[0].shape)}"
            )
        if mask is not None and tuple(mask.shape) != (b,):
            raise ValueError(f"{_FN}: mask must have shape ({b},) to match the batch, got {tuple(mask.shape)}")
        keep = None
        if mask is not None:  # padding rows are not computed at all (no host read: always gather)
            keep = torch.nonzero(mask.to(torch.bool)).flatten()
            batch = tuple(t.index_select(0, keep) if isinstance(t, torch.Tensor) else t for t in batch)
        fast_pass = begin(params, buffers, batch[0])
        return clip(fast_pass, batch[1:], mask, keep, b, clipping=clipping)

    engine.begin = begin
    engine.clip = clip
    engine.per_call_clipping = True
    return engine
