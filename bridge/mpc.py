"""Compile an ``nn.Module`` (torch.fx trace) into a sequence of MPC ops; run it on secret shares.

:func:`compile_module` traces the module with ``torch.fx.symbolic_trace`` and maps every node to an
:class:`MPCOp` through small registries (by module type, by function, by method name). Anything
else raises :class:`MPCCompileError` naming the op and its module path. The program is public (the
architecture and the parameter shapes); the weights stay with the model owner.

:func:`encrypted_inference` is the SPMD program all three parties run (model owner rank 0, data
owner rank 1, dealer rank 2): the model owner shares the weights, the data owner the image, the
layers run on shares, and the logits and the argmax one-hot are revealed to the data owner only.

Supported: Conv2d (zero padding), Linear, GroupNorm, Tanh, Sigmoid, ReLU, AvgPool2d (kernel =
stride, no padding), MaxPool2d, AdaptiveAvgPool2d(1), Identity, Dropout (eval), Flatten;
``x.mean(dim=(2, 3))``, ``torch.flatten``, ``+`` of two tensors, ``+ − × ÷`` with Python numbers,
``torch.tanh/sigmoid/relu``. This covers :class:`dpfunc.models.SmallCNN` (any activation among
Tanh, ReLU, TemperedSigmoid) and :func:`dpfunc.models.resnet18_gn`.

Example:
    >>> from dpfunc.models import SmallCNN
    >>> program = compile_module(SmallCNN(key=Key(0)))
    >>> [op.kind.value for op in program.ops][:4]
    ['conv2d', 'group_norm', 'tanh', 'avg_pool2d']
"""

from __future__ import annotations

import enum
import operator
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from dpfunc.keys import Key
from dpfunc.mpc import protocols as P
from dpfunc.mpc.context import DATA_OWNER, MODEL_OWNER, Context
from dpfunc.mpc.nonlinear import RsqrtConfig, TanhApprox, group_norm, sigmoid, tanh
from dpfunc.mpc.ring import encode

__all__ = [
    "MPCCompileError",
    "OpKind",
    "MPCOp",
    "MPCProgram",
    "compile_module",
    "pool_before_activation",
    "encode_weights",
    "encrypted_inference",
    "InferenceOutput",
    "SharedModel",
    "share_model",
]


class MPCCompileError(ValueError):
    """The module uses an op the MPC compiler does not support (the message names op and path)."""


class OpKind(enum.Enum):
    CONV2D = "conv2d"
    LINEAR = "linear"
    GROUP_NORM = "group_norm"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    RELU = "relu"
    AVG_POOL2D = "avg_pool2d"
    MAX_POOL2D = "max_pool2d"
    MEAN_HW = "mean_hw"
    FLATTEN = "flatten"
    ADD = "add"
    AFFINE = "affine"  # a·x + b with public numbers a, b
    IDENTITY = "identity"


class MPCOp(NamedTuple):
    """One op: ``output = kind(inputs, params, attrs)``; ``params`` are state-dict keys."""

    kind: OpKind
    inputs: tuple[str, ...]
    output: str
    params: tuple[Optional[str], ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    path: str = ""

    def attr(self, name: str) -> Any:
        return dict(self.attrs)[name]


class MPCProgram(NamedTuple):
    """A compiled model: public ops, input/output names and parameter shapes (no weight values)."""

    ops: tuple[MPCOp, ...]
    input: str
    output: str
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]


# --------------------------------------------------------------------------------------- registries
_ModuleRule = Callable[[str, nn.Module, fx.Node, tuple[str, ...]], MPCOp]
MODULE_RULES: dict[type, _ModuleRule] = {}
FUNCTION_RULES: dict[Any, Callable[[fx.Node, str], MPCOp]] = {}
METHOD_RULES: dict[str, Callable[[fx.Node, str], MPCOp]] = {}


def register_module(*types: type):
    def deco(rule: _ModuleRule) -> _ModuleRule:
        for t in types:
            MODULE_RULES[t] = rule
        return rule

    return deco


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(int(a) for a in v)


def _fail(node: fx.Node, path: str, what: str) -> MPCCompileError:
    return MPCCompileError(
        f"compile_module: unsupported op {what} at module path {path or '<root>'!r} (fx node "
        f"{node.name!r}); supported modules: {sorted(t.__name__ for t in MODULE_RULES)}"
    )


@register_module(nn.Conv2d)
def _conv(name, m, node, inputs):
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise _fail(node, name, f"Conv2d(padding={m.padding!r}, padding_mode={m.padding_mode!r})")
    attrs = (("stride", _pair(m.stride)), ("padding", _pair(m.padding)), ("dilation", _pair(m.dilation)), ("groups", m.groups))
    return MPCOp(OpKind.CONV2D, inputs, node.name, (f"{name}.weight", f"{name}.bias" if m.bias is not None else None), attrs, name)


@register_module(nn.Linear)
def _linear(name, m, node, inputs):
    return MPCOp(OpKind.LINEAR, inputs, node.name, (f"{name}.weight", f"{name}.bias" if m.bias is not None else None), (), name)


@register_module(nn.GroupNorm)
def _gn(name, m, node, inputs):
    params = (f"{name}.weight", f"{name}.bias") if m.affine else (None, None)
    return MPCOp(OpKind.GROUP_NORM, inputs, node.name, params, (("groups", m.num_groups), ("eps", m.eps)), name)


@register_module(nn.Tanh)
def _tanh(name, m, node, inputs):
    return MPCOp(OpKind.TANH, inputs, node.name, path=name)


@register_module(nn.Sigmoid)
def _sigmoid(name, m, node, inputs):
    return MPCOp(OpKind.SIGMOID, inputs, node.name, path=name)


@register_module(nn.ReLU)
def _relu(name, m, node, inputs):
    return MPCOp(OpKind.RELU, inputs, node.name, path=name)


@register_module(nn.Identity, nn.Dropout)
def _identity(name, m, node, inputs):
    return MPCOp(OpKind.IDENTITY, inputs, node.name, path=name)


@register_module(nn.Flatten)
def _flatten(name, m, node, inputs):
    if m.start_dim != 1 or m.end_dim != -1:
        raise _fail(node, name, f"Flatten(start_dim={m.start_dim}, end_dim={m.end_dim})")
    return MPCOp(OpKind.FLATTEN, inputs, node.name, path=name)


@register_module(nn.AvgPool2d)
def _avg(name, m, node, inputs):
    k, s = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size)
    if k != s or k[0] != k[1] or _pair(m.padding) != (0, 0) or m.ceil_mode or m.divisor_override:
        raise _fail(node, name, f"AvgPool2d(kernel_size={m.kernel_size}, stride={m.stride}, padding={m.padding}) (only square kernel = stride, no padding)")
    return MPCOp(OpKind.AVG_POOL2D, inputs, node.name, attrs=(("kernel", k[0]),), path=name)


@register_module(nn.MaxPool2d)
def _max(name, m, node, inputs):
    k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
    if len({*k}) != 1 or len({*s}) != 1 or len({*p}) != 1 or _pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
        raise _fail(node, name, f"MaxPool2d({m}) (only square, dilation 1, no ceil_mode)")
    return MPCOp(OpKind.MAX_POOL2D, inputs, node.name, attrs=(("kernel", k[0]), ("stride", s[0]), ("padding", p[0])), path=name)


@register_module(nn.AdaptiveAvgPool2d)
def _adaptive(name, m, node, inputs):
    if _pair(m.output_size) != (1, 1):
        raise _fail(node, name, f"AdaptiveAvgPool2d(output_size={m.output_size}) (only 1)")
    return MPCOp(OpKind.MEAN_HW, inputs, node.name, attrs=(("keepdim", True),), path=name)


def _unary(kind: OpKind):
    def rule(node: fx.Node, path: str) -> MPCOp:
        return MPCOp(kind, (node.args[0].name,), node.name, path=path)

    return rule


for _fn, _kind in [(torch.tanh, OpKind.TANH), (torch.sigmoid, OpKind.SIGMOID), (torch.relu, OpKind.RELU), (F.relu, OpKind.RELU)]:
    FUNCTION_RULES[_fn] = _unary(_kind)
METHOD_RULES.update({"tanh": _unary(OpKind.TANH), "sigmoid": _unary(OpKind.SIGMOID), "relu": _unary(OpKind.RELU)})


def _arith(node: fx.Node, path: str) -> MPCOp:
    a, b = node.args[:2]
    target = node.target
    num = (int, float)
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if target in (operator.add, torch.add) and not node.kwargs:
            return MPCOp(OpKind.ADD, (a.name, b.name), node.name, path=path)
        raise _fail(node, path, f"{getattr(target, '__name__', target)} of two secret tensors")
    if isinstance(a, fx.Node) and isinstance(b, num):
        scale, shift = {operator.add: (1.0, b), torch.add: (1.0, b), operator.sub: (1.0, -b), operator.mul: (b, 0.0),
                        operator.truediv: (1.0 / b if b else None, 0.0)}.get(target, (None, None))
    elif isinstance(b, fx.Node) and isinstance(a, num):
        scale, shift = {operator.add: (1.0, a), torch.add: (1.0, a), operator.sub: (-1.0, a), operator.mul: (a, 0.0)}.get(target, (None, None))
        a = b
    else:
        scale = None
    if scale is None:
        raise _fail(node, path, f"{getattr(target, '__name__', target)}{tuple(type(v).__name__ for v in node.args)}")
    return MPCOp(OpKind.AFFINE, (a.name,), node.name, attrs=(("scale", float(scale)), ("shift", float(shift))), path=path)


for _fn in (operator.add, torch.add, operator.sub, operator.mul, operator.truediv):
    FUNCTION_RULES[_fn] = _arith


def _mean(node: fx.Node, path: str) -> MPCOp:
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if dims is None or sorted(d % 4 for d in dims) != [2, 3]:
        raise _fail(node, path, f"mean(dim={dims}) (only the spatial dims (2, 3) of an NCHW tensor)")
    return MPCOp(OpKind.MEAN_HW, (node.args[0].name,), node.name, attrs=(("keepdim", bool(keep)),), path=path)


def _flatten_fn(node: fx.Node, path: str) -> MPCOp:
    start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
    end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
    if start != 1 or end != -1:
        raise _fail(node, path, f"flatten(start_dim={start}, end_dim={end}) (only start_dim=1)")
    return MPCOp(OpKind.FLATTEN, (node.args[0].name,), node.name, path=path)


METHOD_RULES["mean"] = _mean
METHOD_RULES["flatten"] = _flatten_fn
FUNCTION_RULES[torch.flatten] = _flatten_fn
FUNCTION_RULES[torch.mean] = _mean


def _path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return list(stack)[-1] if stack else ""


def compile_module(module: nn.Module, *, pool_first: bool = True) -> MPCProgram:
    """Trace ``module`` (in eval mode semantics) into an :class:`MPCProgram`.

    ``pool_first`` moves a max-pooling in front of the monotone activation before it
    (:func:`pool_before_activation`; the same function, fewer comparisons).

    Raises:
        MPCCompileError: an unsupported op; the message names it and its module path.
        TypeError: ``module`` is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"compile_module: module must be an nn.Module, got {type(module).__name__}")
    if any(True for _ in module.buffers()):
        names = [n for n, _ in module.named_buffers()]
        raise MPCCompileError(f"compile_module: modules with buffers are not supported (BatchNorm?), found {names[:3]}")
    graph = fx.symbolic_trace(module).graph
    mods = dict(module.named_modules())
    ops: list[MPCOp] = []
    inputs, output = [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise MPCCompileError("compile_module: the module must return a single tensor")
            output = out.name
        elif node.op == "call_module":
            sub = mods[node.target]
            rule = MODULE_RULES.get(type(sub))
            if rule is None:
                raise _fail(node, node.target, type(sub).__name__)
            ops.append(rule(node.target, sub, node, tuple(a.name for a in node.args if isinstance(a, fx.Node))))
        elif node.op == "call_function":
            rule = FUNCTION_RULES.get(node.target)
            if rule is None:
                raise _fail(node, _path(node), getattr(node.target, "__name__", str(node.target)))
            ops.append(rule(node, _path(node)))
        elif node.op == "call_method":
            rule = METHOD_RULES.get(node.target)
            if rule is None:
                raise _fail(node, _path(node), f"Tensor.{node.target}")
            ops.append(rule(node, _path(node)))
        else:  # get_attr: a parameter used outside a supported module
            raise _fail(node, str(node.target), f"{node.op} {node.target}")
    if len(inputs) != 1 or output is None:
        raise MPCCompileError(f"compile_module: the module must take one tensor input, got {inputs}")
    if pool_first:
        ops = pool_before_activation(ops, output)
    shapes = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
    return MPCProgram(tuple(ops), inputs[0], output, shapes)


MONOTONE_KINDS = (OpKind.RELU, OpKind.TANH, OpKind.SIGMOID)
"""Activations that are monotone non-decreasing: ``maxpool(act(x)) = act(maxpool(x))``."""


def pool_before_activation(ops: list[MPCOp], output: str) -> list[MPCOp]:
    """Rewrite ``activation → MaxPool2d`` into ``MaxPool2d → activation`` (a peephole pass).

    For a monotone non-decreasing activation ``a`` (ReLU, tanh, sigmoid) and any window,
    ``max_i a(x_i) = a(max_i x_i)``; padded positions are ignored by both orders (PyTorch pads
    max-pooling with −∞, the MPC protocol with a very negative public value, and every window holds at
    least one real element since PyTorch requires ``padding ≤ kernel / 2``). So the activation runs on
    the pooled tensor — ``stride²`` times fewer elements (4× for ResNet's stem). The rewrite applies
    only when the activation's output feeds nothing but that pooling and is not the program's output.
    """
    uses: dict[str, int] = {}
    for op in ops:
        for name in op.inputs:
            uses[name] = uses.get(name, 0) + 1
    out = list(ops)
    i = 0
    while i + 1 < len(out):
        act, pool = out[i], out[i + 1]
        if (act.kind in MONOTONE_KINDS and pool.kind is OpKind.MAX_POOL2D and pool.inputs == (act.output,)
                and uses.get(act.output) == 1 and act.output != output):
            out[i] = pool._replace(inputs=act.inputs, output=act.output)  # pooled pre-activation
            out[i + 1] = act._replace(inputs=(act.output,), output=pool.output)
            i += 2
        else:
            i += 1
    return out


def encode_weights(module: nn.Module, program: MPCProgram, fp=None) -> torch.Tensor:
    """The model owner's flat int64 vector of encoded parameters (in ``program.param_shapes`` order)."""
    from dpfunc.mpc.ring import FixedPoint

    fp = fp or FixedPoint()
    params = dict(module.named_parameters())
    return torch.cat([encode(params[n].detach(), fp).reshape(-1) for n, _ in program.param_shapes])


# ---------------------------------------------------------------------------------------- execution
_EXEC: dict[OpKind, Callable[..., torch.Tensor]] = {}


def _executes(kind: OpKind):
    def deco(fn):
        _EXEC[kind] = fn
        return fn

    return deco


def _bias(y: torch.Tensor, b: Optional[torch.Tensor], dims: int) -> torch.Tensor:
    return y if b is None else y + b.view((1, -1) + (1,) * dims)


@_executes(OpKind.CONV2D)
def _x_conv(ctx, op, xs, w, b, cfg):
    y = P.conv2d(ctx, xs[0], w, op.attr("stride"), op.attr("padding"), op.attr("dilation"), op.attr("groups"))
    return _bias(y, b, 2)


@_executes(OpKind.LINEAR)
def _x_linear(ctx, op, xs, w, b, cfg):
    # a masked weight is stored transposed (see share_model)
    return _bias(P.matmul(ctx, xs[0], w if isinstance(w, P.MaskedOperand) else w.t()), b, 0)


@_executes(OpKind.GROUP_NORM)
def _x_gn(ctx, op, xs, w, b, cfg):
    return group_norm(ctx, xs[0], op.attr("groups"), w, b, op.attr("eps"), cfg["rsqrt"])


_EXEC[OpKind.TANH] = lambda ctx, op, xs, w, b, cfg: tanh(ctx, xs[0], cfg["tanh"], cfg["bits"])
_EXEC[OpKind.SIGMOID] = lambda ctx, op, xs, w, b, cfg: sigmoid(ctx, xs[0], cfg["tanh"], cfg["bits"])
_EXEC[OpKind.RELU] = lambda ctx, op, xs, w, b, cfg: P.relu(ctx, xs[0], cfg["bits"])
_EXEC[OpKind.IDENTITY] = lambda ctx, op, xs, w, b, cfg: xs[0]
_EXEC[OpKind.FLATTEN] = lambda ctx, op, xs, w, b, cfg: xs[0].reshape(xs[0].shape[0], -1)
_EXEC[OpKind.ADD] = lambda ctx, op, xs, w, b, cfg: xs[0] + xs[1]
_EXEC[OpKind.AVG_POOL2D] = lambda ctx, op, xs, w, b, cfg: P.avg_pool2d(ctx, xs[0], op.attr("kernel"))
_EXEC[OpKind.MAX_POOL2D] = lambda ctx, op, xs, w, b, cfg: P.max_pool2d(
    ctx, xs[0], op.attr("kernel"), op.attr("stride"), op.attr("padding"), cfg["bits"])


@_executes(OpKind.MEAN_HW)
def _x_mean(ctx, op, xs, w, b, cfg):
    x = xs[0]
    y = P.truncate(ctx, x.sum(dim=(2, 3), keepdim=op.attr("keepdim")), x.shape[2] * x.shape[3])
    return y


@_executes(OpKind.AFFINE)
def _x_affine(ctx, op, xs, w, b, cfg):
    scale, shift = op.attr("scale"), op.attr("shift")
    y = xs[0] if scale == 1.0 else (xs[0] * int(scale) if float(scale).is_integer() else P.mul_public(ctx, xs[0], scale))
    return P.add_public(ctx, y, int(round(shift * ctx.fp.scale))) if shift else y


class InferenceOutput(NamedTuple):
    """What the data owner learns: logits (ring, fixed point) and the argmax one-hot (integers)."""

    logits: torch.Tensor
    onehot: torch.Tensor


class SharedModel(NamedTuple):
    """This party's shares of the model, made once per session by :func:`share_model`.

    Attributes:
        params: this party's additive share of every parameter (by state-dict name).
        masked: the weights of the convolutions and linear layers as
            :class:`~dpfunc.mpc.protocols.MaskedOperand` (Linear weights transposed, as used); empty
            when masks are not reused.
    """

    params: dict[str, torch.Tensor]
    masked: dict[str, P.MaskedOperand]


_MASKED_KINDS = (OpKind.CONV2D, OpKind.LINEAR)


def share_model(ctx: Context, program: MPCProgram, weights: Optional[torch.Tensor] = None, *, key: Key,
                reuse_masks: bool = True) -> SharedModel:
    """Share the model owner's weights once (one message), and mask each conv/linear weight once.

    With ``reuse_masks`` the weight tensors of the convolutions and linear layers get one dealer mask
    each and ``w − b`` is opened once, for every later batch (one round for all of them; see
    :func:`dpfunc.mpc.protocols.mask_operands` for why this is secure: the weights are fixed, a mask
    is opened once, triples stay fresh). Every batch then sends only the masked activations and the
    dealer only fresh half-triples ``(a, op(a, b))``. Without it, each product draws a full triple
    (the weights are re-masked in every product).

    Args:
        ctx: this party's context; the dealer and the data owner pass ``weights=None``.
        program: the compiled model (public).
        weights: the model owner's :func:`encode_weights` vector.
        key: the model owner's own key (the sharing mask; unused elsewhere).
        reuse_masks: mask the conv/linear weights once for the session (default).
    """
    n_params = sum(int(torch.Size(s).numel()) for _, s in program.param_shapes)
    flat_w = P.share_from(ctx, MODEL_OWNER, weights, (n_params,), key)
    params, i = {}, 0
    for name, shape in program.param_shapes:
        n = int(torch.Size(shape).numel())
        params[name] = flat_w[i : i + n].view(shape)
        i += n
    masked: dict[str, P.MaskedOperand] = {}
    if reuse_masks:
        names = list(dict.fromkeys(op.params[0] for op in program.ops if op.kind in _MASKED_KINDS and op.params[0]))
        kinds = {op.params[0]: op.kind for op in program.ops if op.kind in _MASKED_KINDS}
        ys = [params[n].t() if kinds[n] is OpKind.LINEAR else params[n] for n in names]
        masked = dict(zip(names, P.mask_operands(ctx, ys, fuse=True)))
    return SharedModel(params, masked)


def encrypted_inference(
    ctx: Context,
    program: MPCProgram,
    input_shape: tuple[int, ...],
    *,
    key: Key,
    image: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    model: Optional[SharedModel] = None,
    tanh_approx: TanhApprox = TanhApprox(),
    rsqrt_cfg: RsqrtConfig = RsqrtConfig(),
    comparison_bits: int = 32,
) -> Optional[InferenceOutput]:
    """The SPMD program of encrypted inference; every party calls it with its own arguments.

    Args:
        ctx: this party's context (rank 0 model owner, 1 data owner, 2 dealer).
        program: the compiled model (public).
        input_shape: ``(B, C, H, W)`` (public).
        key: this party's own key (masks for the input it shares; unused by the dealer).
        image: the data owner's encoded image, int64 ``input_shape`` (``None`` elsewhere).
        weights: the model owner's :func:`encode_weights` vector (``None`` elsewhere); shared in
            this call, with fresh triples for every product. Ignored when ``model`` is given.
        model: the session's :func:`share_model` result (all parties), to share and mask the weights
            once for many batches.
        comparison_bits: word width of the activations' comparisons (tanh, sigmoid, ReLU, max-pool;
            :func:`dpfunc.mpc.protocols.ltz`): 32 (default) is exact while every activation input
            satisfies ``|v| < 2^(31 − f)`` (32768 for f = 16; max-pool inputs ``|v| < 16384``) and
            costs about half of 64, which is exact on the whole ring. After a GroupNorm the bound
            holds by construction: a normalised value is at most ``√n`` in magnitude (``n`` the
            group's size), so ``|v| ≤ |γ|·√n + |β|``. The GroupNorm's own comparisons and the
            argmax always use 64 bits.

    Returns:
        :class:`InferenceOutput` on the data owner, ``None`` on the others.
    """
    if comparison_bits not in (32, 64) or comparison_bits - 2 - ctx.fp.fractional_bits < 4:
        raise ValueError(f"encrypted_inference: comparison_bits must be 32 or 64 (and leave at least 4 integer "
                         f"bits above the {ctx.fp.fractional_bits} fractional bits), got {comparison_bits!r}")
    if model is None:
        model = share_model(ctx, program, weights, key=key, reuse_masks=False)
    params = model.params
    x = P.share_from(ctx, DATA_OWNER, image, tuple(input_shape), key)
    env = {program.input: x}
    cfg = {"tanh": tanh_approx, "rsqrt": rsqrt_cfg, "bits": comparison_bits}
    for op in program.ops:
        w = None
        if len(op.params) > 0 and op.params[0]:
            w = model.masked.get(op.params[0], params.get(op.params[0])) if op.kind in _MASKED_KINDS else params.get(op.params[0])
        b = params.get(op.params[1]) if len(op.params) > 1 and op.params[1] else None
        env[op.output] = _EXEC[op.kind](ctx, op, [env[n] for n in op.inputs], w, b, cfg)
    logits = env[program.output]
    onehot = P.argmax_onehot(ctx, logits)
    both = P.reveal_to(ctx, DATA_OWNER, torch.cat([logits, onehot], dim=-1))
    if both is None:
        return None
    k = logits.shape[-1]
    return InferenceOutput(both[..., :k], both[..., k:])
