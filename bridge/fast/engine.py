"""``fast_engine``: per-example clipping without per-example gradients (ghost norms + book-keeping).

One forward and ONE backward of ``Σ_i loss_i`` give everything:

1. The forward runs ``functional_call(module, (params, buffers), x)`` with temporary forward hooks on
   the supported layers. Each hook keeps the layer's input ``a`` and wraps its output in an identity
   autograd node (a *tap*). No parameter requires grad: the only leaf of the backward is a 0-d
   anchor that every tap takes as a second input, so autograd computes activation gradients and
   never a parameter gradient.
2. ``torch.autograd.grad(Σ_i loss_i, anchor)`` runs the backward. As it passes a tap it hands over
   ``g = ∂Σloss/∂output``; since example ``i`` only influences row ``i``, ``g[i]`` is example ``i``'s
   output gradient. The layer's rule (:mod:`.layers`) turns ``(a, g)`` into per-example squared norms
   right there and keeps either the small per-example gradient or ``(a, g)``.
3. Parameters of layers without a rule (any custom module) get per-example gradients by
   ``vmap(grad)`` over the model, with respect to those parameters only (mixed engine).
4. Norms per clipping group → clip factors ``c_i`` (the core's :func:`~dpfunc.clipping.clip_factors`)
   → clipped sums ``Σ_i c_i ∇θ loss_i`` from what the rules kept (e.g. ``(c·g)ᵀ a`` for Linear).
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from dpfunc.clipping import ClippedSum, Clipping, check_finite_norms, clip_factors, group_norms
from dpfunc.step import EngineOutput, GradEngine

from dpfunc.bridge.fast.layers import Call, LayerGrads, rule_for

__all__ = ["fast_engine"]

_FN = "fast_engine"


class _Tap(torch.autograd.Function):
    """Identity on a layer output; its backward hands the output gradient to ``sink``."""

    @staticmethod
    def forward(ctx, out, anchor, sink, clone):
        ctx.sink = sink
        return out.clone() if clone else out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        sink, ctx.sink = ctx.sink, None  # the graph outlives the backward: keep nothing alive through it
        sink(g)
        return g, None, None, None


class _Layer:
    """One supported module in one engine call: its rule, parameter names, and recorded calls."""

    __slots__ = ("module", "rule", "attrs", "names", "pending", "calls", "result")

    def __init__(self, module, rule, names):
        self.module, self.rule, self.names = module, rule, names  # names: attr -> params key
        self.attrs = frozenset(names)
        self.reset()

    def reset(self):
        self.pending: list[list] = []  # Call fields: [x, g or None, weight, saved]
        self.calls = 0
        self.result: LayerGrads | None = None


class _Plan:
    """Which parameters take which path, computed once per (module, params keys)."""

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
        for _, m in module.named_modules(remove_duplicate=True):
            rule = rule_for(m)
            if rule is None:
                continue
            own = {}
            for attr in ("weight", "bias"):
                p = m._parameters.get(attr)
                if p is None or id(p) not in canonical:
                    continue
                name = canonical[id(p)]
                if name in wanted and users[name] == 1:  # tied parameters take the vmap path
                    own[attr] = name
            layers.append(_Layer(m, rule, own))
            fast.update(own.values())
        self.layers = layers
        self.names = list(names)
        self.fallback = [n for n in names if n not in fast]
        self.verified = False  # until one forward has shown that no fast parameter is read elsewhere

    def demote(self, foreign: set[str]) -> None:
        """Parameters read outside their own layer's forward go to the vmap path."""
        for layer in self.layers:
            layer.names = {a: n for a, n in layer.names.items() if n not in foreign}
            layer.attrs = frozenset(layer.names)
        fast = {n for layer in self.layers for n in layer.names.values()}
        self.fallback = [n for n in self.names if n not in fast]


class _ForeignUse(TorchFunctionMode):
    """Finds fast-path parameters that reach a torch function outside their own layer's forward
    (e.g. ``MultiheadAttention`` reads ``out_proj.weight`` directly): those need the vmap path."""

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
    at about the cost of one ordinary training step.

    Args:
        model: an ``nn.Module``, or an ``apply_fn`` from :func:`~dpfunc.bridge.functionalize` (it carries
            ``apply_fn.module``). The module is never mutated; hooks live only during a call.
        loss_from_output: ``loss_from_output(output, *targets) -> (B,)`` per-example losses, e.g.
            ``lambda out, y: F.cross_entropy(out, y, reduction="none")``. Row ``i`` must depend on
            example ``i`` only (no batch statistics: no BatchNorm in training mode).
        clipping: :class:`~dpfunc.FlatClipping` or :class:`~dpfunc.PerLayerClipping`.
        ghost_norm: per Linear-on-sequences / conv / Embedding layer, ``None`` chooses ghost norm or
            instantiation by a cost model (ghost iff ``T·(d_in + d_out) < d_in·d_out``, see
            :mod:`dpfunc.bridge.fast.layers`); ``True`` / ``False`` force one (for tests and tuning).
        fallback_chunk_size: vmap chunk size for parameters of layers without a rule.
        views_per_example: ``None`` (the input is ``(B, ...)``) or ``K >= 1``: the input is ``(B, K, ...)``,
            K augmented views of each example (augmentation multiplicity, De et al. 2022; see
            :func:`dpfunc.data.augment_views`), and targets stay ``(B, ...)``: example ``i``'s loss is the
            mean over its views and its gradient — the mean of its view gradients — is clipped as one,
            as ``vmap_engine`` does with :func:`dpfunc.data.multiplicity_loss`. The sensitivity stays C.
            Each layer sees the K views as K calls, so norms and clipped sums come from one forward
            and backward of ``B·K`` rows.

    Returns:
        ``engine(params, buffers, batch, mask) -> EngineOutput(ClippedSum, losses)`` with
        ``batch = (x, *targets)``, leading dim ``B``; ``mask`` an optional ``(B,)`` of real rows
        (padding rows are not computed at all; their norms, losses and contributions are 0).

    Supported layers: ``Linear`` (any leading dims), ``Conv1d``/``Conv2d`` (stride, padding incl.
    modes and 'same', dilation, groups), ``Embedding`` (``padding_idx``), ``LayerNorm``, ``GroupNorm``,
    ``RMSNorm``. Parameters elsewhere (custom modules, ``MultiheadAttention``'s fused projections,
    tied weights, parametrizations) are handled by ``vmap`` — correct, at vmap's cost for them.

    A parameter of a supported layer that the model also reads outside that layer's forward (as
    ``MultiheadAttention`` reads ``out_proj.weight``) is detected on the first call (a
    ``TorchFunctionMode`` watches that forward) and moved to the vmap path. A model that modifies a
    layer's output in place is detected too (the pass is repeated with a copied output). An engine
    caches its plan per parameter-name set and is not meant to be called from several threads at once.

    Raises:
        ValueError: non-finite per-example gradient norms of real examples (as the core does), a
            loss of the wrong shape, or a mask of the wrong shape.

    Example:
        >>> engine = fast_engine(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), FlatClipping(1.0))
        >>> out = engine(params, buffers, (x, y), None)
        >>> out.grads.grads["fc.weight"].shape, out.losses.shape
    """
    if isinstance(model, nn.Module):
        module = model

        def apply_fn(params, buffers, *args):
            return functional_call(module, (params, buffers), args, tie_weights=True, strict=False)

    elif callable(model) and isinstance(getattr(model, "module", None), nn.Module):
        module, apply_fn = model.module, model
    else:
        raise TypeError(
            f"{_FN}: model must be an nn.Module or an apply_fn from dpfunc.bridge.functionalize (with .module), "
            f"got {type(model).__name__}"
        )
    if not callable(loss_from_output):
        raise TypeError(f"{_FN}: loss_from_output must be callable (output, *targets) -> (B,), got {loss_from_output!r}")
    if not (hasattr(clipping, "group_bounds") and hasattr(clipping, "group_of")):
        raise TypeError(f"{_FN}: clipping must be FlatClipping or PerLayerClipping, got {clipping!r}")
    if ghost_norm not in (None, True, False):
        raise ValueError(f"{_FN}: ghost_norm must be None (cost model), True or False, got {ghost_norm!r}")
    views = views_per_example
    if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1):
        raise ValueError(f"{_FN}: views_per_example must be None or an int >= 1, got {views!r}")
    plans: dict[tuple, _Plan] = {}

    @torch.no_grad()  # outputs carry no graph; the one backward inside enables grad for itself
    def engine(params, buffers, batch, mask):
        batch = tuple(batch)
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
        names = list(params)
        if not names:
            raise ValueError(f"{_FN}: params is empty; pass the dict of parameters to differentiate")
        key = tuple(names)
        if key not in plans:
            plans[key] = _Plan(module, names)
        plan = plans[key]
        bounds = clipping.group_bounds(names)
        ref = next(iter(params.values()))
        keep = None
        if mask is not None:  # padding rows are not computed at all (no host read: always gather)
            keep = torch.nonzero(mask.to(torch.bool)).flatten()
            batch = tuple(t.index_select(0, keep) if isinstance(t, torch.Tensor) else t for t in batch)
        n = batch[0].shape[0]

        sq, losses, clip_sums = _norms(plan, apply_fn, loss_from_output, params, buffers, batch, n, ghost_norm, fallback_chunk_size, ref, views)
        like = ref.new_zeros(n, dtype=_norm_dtype(ref))
        norms, groups = group_norms({k: v.to(like.dtype) for k, v in sq.items()}, clipping, names, like)

        def full(t):
            if keep is None:
                return t
            return t.new_zeros((b, *t.shape[1:])).index_copy_(0, keep, t)

        full_norms = full(norms)
        check_finite_norms(_FN, full_norms, mask)
        factors = clip_factors(groups, bounds)
        grads = clip_sums({name: factors[clipping.group_of(name)] for name in names})
        grads = {name: grads[name] if name in grads else torch.zeros_like(params[name]) for name in names}
        count = mask.to(torch.int64).sum() if mask is not None else torch.tensor(b)
        out = ClippedSum(grads, full_norms, {g: full(v) for g, v in groups.items()}, clipping.sensitivity(names), count)
        return EngineOutput(out, full(losses.detach()))

    return engine


def _norm_dtype(ref: torch.Tensor) -> torch.dtype:
    return ref.dtype if ref.is_floating_point() else torch.get_default_dtype()


def _norms(plan, apply_fn, loss_from_output, params, buffers, batch, n, ghost, chunk, ref, views):
    """Squared per-example norms per parameter name ``(n,)``, losses ``(n,)`` and a function
    ``factors -> clipped sums``, all for the real rows only."""
    x, targets = batch[0], batch[1:]
    results: list[tuple[_Layer, LayerGrads]] = []
    if n == 0:
        losses = ref.new_zeros(0, dtype=_norm_dtype(ref))
        sq = {}
    else:
        losses = None
        clone = False
        while losses is None:
            try:
                losses, results = _forward_backward(plan, apply_fn, loss_from_output, params, buffers, x, targets, n, ghost, clone, views)
            except RuntimeError as e:  # a view fails only if the model modifies a layer output in place
                if clone or "modified inplace" not in str(e):
                    raise
                clone = True
        sq = {}
        for layer, res in results:
            for attr, s in res.sq.items():
                name = layer.names[attr]
                sq[name] = sq[name] + s if name in sq else s
    fallback_pe = {}
    if plan.fallback and n > 0:
        fallback_pe = _vmap_grads(plan.fallback, apply_fn, loss_from_output, params, buffers, x, targets, chunk, views)
        for name, pe in fallback_pe.items():
            sq[name] = pe.reshape(n, -1).square().sum(1)

    def clip_sums(factors):
        out = {}
        for layer, res in results:
            local = res.clipped({attr: factors[name] for attr, name in layer.names.items()})
            for attr, v in local.items():
                name = layer.names[attr]
                out[name] = out[name] + v if name in out else v
        for name, pe in fallback_pe.items():
            out[name] = torch.tensordot(factors[name].to(pe.dtype), pe, dims=([0], [0]))
        return {k: v.to(params[k].dtype) for k, v in out.items()}

    return sq, losses, clip_sums


def _calls(records: list[list], views: int | None) -> list[Call]:
    """The recorded calls as rule inputs. With K views, a call on the ``B·K`` rows (example-major) is K
    calls on B rows — view k of every example — so a rule's sum over calls is the sum over views."""
    calls = [Call(*r) for r in records if r[1] is not None]
    if views is None or views == 1:  # rows are examples
        return calls

    def pick(t, k):
        return t.unflatten(0, (-1, views)).select(1, k) if isinstance(t, torch.Tensor) and t.dim() else t

    def view_k(c: Call, k: int) -> Call:
        saved = tuple(pick(s, k) for s in c.saved) if isinstance(c.saved, tuple) else c.saved
        return Call(pick(c.x, k), pick(c.g, k), c.weight, saved)

    return [view_k(c, k) for c in calls for k in range(views)]


def _forward_backward(plan, apply_fn, loss_from_output, params, buffers, x, targets, n, ghost, clone, views):
    """One forward and one backward; returns ``(losses, [(layer, LayerGrads)])`` or ``(None, [])`` when
    the plan had to be corrected (first call only) and the pass must be repeated."""
    anchor = torch.zeros((), requires_grad=True)
    handles = []
    layers = [layer for layer in plan.layers if layer.attrs]
    for layer in layers:
        layer.reset()
    detached = {k: v.detach() for k, v in params.items()}
    watch = None
    if not plan.verified:
        watch = _ForeignUse({id(detached[name]): (layer.module, name) for layer in layers for name in layer.names.values()})
        for layer in layers:
            handles.append(layer.module.register_forward_pre_hook(lambda m, a: watch.active.append(m)))
            handles.append(layer.module.register_forward_hook(lambda m, a, o: watch.active.pop() and None, always_call=True))

    def make_hook(layer: _Layer):
        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return None
            inp = args[0] if args else next(iter(kwargs.values()))
            # Detached: the rules need values only. A kept input that still carried its graph would
            # give the clipped sums (and the next params) a grad_fn chaining every step's graph.
            saved = layer.rule.capture(module, output)
            if isinstance(saved, tuple):
                saved = tuple(s.detach() if isinstance(s, torch.Tensor) else s for s in saved)
            record = [inp.detach() if isinstance(inp, torch.Tensor) else inp, None, getattr(module, "weight", None), saved]  # Call
            layer.pending.append(record)
            layer.calls += 1

            def sink(g):
                record[1] = g
                if layer.calls == 1:  # a layer called once is reduced right here, freeing what it can
                    layer.result = layer.rule.grads(module, _calls([record], views), layer.attrs, ghost)
                    layer.pending.clear()
                    record.clear()

            return _Tap.apply(output, anchor, sink, clone)

        return hook

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(make_hook(layer), prepend=True, with_kwargs=True))
        with torch.enable_grad(), (watch if watch is not None else contextlib.nullcontext()):
            if views is not None:  # example-major rows: view k of example i is row i·K + k
                x = x.flatten(0, 1)
                targets = tuple(t.repeat_interleave(views, 0) if isinstance(t, torch.Tensor) and t.dim() else t for t in targets)
            out = apply_fn(detached, buffers, x)
            losses = loss_from_output(out, *targets)
            rows = n * (views or 1)
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (rows,):
                raise ValueError(
                    f"{_FN}: loss_from_output must return per-example losses of shape ({rows},), got "
                    f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}; "
                    "use reduction='none'"
                )
            if views is not None:
                losses = losses.view(n, views).mean(1)
            if watch is not None:
                plan.verified = True
                if watch.foreign:
                    plan.demote(watch.foreign)
                    return None, []
            if losses.requires_grad:
                torch.autograd.grad(losses.sum(), anchor, allow_unused=True)
            losses = losses.detach()
            del out
    finally:
        for h in handles:
            h.remove()
    results = []
    for layer in layers:
        if layer.result is None:  # (grad mode off: engine() runs this under no_grad)
            calls = _calls(layer.pending, views)
            if calls:
                layer.result = layer.rule.grads(layer.module, calls, layer.attrs, ghost)
        if layer.result is not None:
            results.append((layer, layer.result))
        layer.pending, layer.result = [], None  # the plan is cached: hold no tensors past the call
    return losses, results


def _vmap_grads(names, apply_fn, loss_from_output, params, buffers, x, targets, chunk, views):
    """Per-example gradients of the parameters ``names`` only, by ``vmap(grad)`` (the oracle's method)."""
    fixed = {k: v.detach() for k, v in params.items() if k not in names}
    own = {k: params[k].detach() for k in names}

    def loss(p, xi, *ti):
        if views is None:
            out = apply_fn({**fixed, **p}, buffers, xi.unsqueeze(0))
            return loss_from_output(out, *(t.unsqueeze(0) for t in ti))[0]
        out = apply_fn({**fixed, **p}, buffers, xi)  # xi: (K, ...), one example's views
        return loss_from_output(out, *(t.unsqueeze(0).expand(views, *t.shape) for t in ti)).mean()

    dims = (None, 0) + tuple(0 if isinstance(t, torch.Tensor) else None for t in targets)
    return vmap(grad(loss), in_dims=dims, chunk_size=chunk)(own, x, *targets)
