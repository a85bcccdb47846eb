"""Small helpers on parameter dicts (``dict[str, Tensor]``, keyed like a state dict)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

Params = dict[str, torch.Tensor]


def global_norm(tree: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The l2 norm of all leaves together (a 0-d tensor)."""
    leaves = [v.reshape(-1) for v in tree.values()]
    if not leaves:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.cat(leaves))


def check_same_keys(fn: str, a: Mapping, b: Mapping, names: tuple[str, str]) -> None:
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"{fn}: {names[0]} and {names[1]} must have the same keys; they differ in {missing}")


def leaves(tree: Mapping[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """``tree``'s tensors in the order of ``names`` (the lists that ``torch._foreach_*`` ops take)."""
    return [tree[k] for k in names]


# dtypes whose multi-tensor arithmetic is element for element that of the per-tensor ops. Not bf16 /
# fp16: there the in-place ``_foreach_mul_`` rounds differently from ``t * s`` (measured on CPU).
FOREACH_DTYPES = frozenset({torch.float32, torch.float64})


def foreach_ok(*lists: list[torch.Tensor]) -> bool:
    """Whether ``torch._foreach_*`` on these lists is bit-identical to the per-tensor ops: non-empty,
    every tensor float32/float64 and on the CPU. On CPU the multi-tensor ops run the per-tensor kernels
    in one C++ loop (same bits, less Python and dispatch). CUDA has its own multi-tensor kernels, and
    ``_foreach_div_`` by a scalar divides where ``t / s`` multiplies by ``1/s``: not the same bits, and
    unverified for the others, so CUDA tensors keep the per-tensor ops (the noise streams stay as
    published)."""
    return bool(lists[0]) and all(t.dtype in FOREACH_DTYPES and t.device.type == "cpu" for ts in lists for t in ts)


def tree_mul(tree: Mapping[str, torch.Tensor], factor: float) -> Params:
    """``{k: v * factor}`` as ONE multi-tensor op (``torch._foreach_mul``) instead of one op per leaf.

    Element for element the same product as ``v * factor`` (bit-identical; other dtypes than
    float32/float64 take the per-leaf ops); a new dict of new tensors.
    """
    names = list(tree)
    vs = leaves(tree, names)
    if not foreach_ok(vs):
        return {k: v * factor for k, v in zip(names, vs)}
    return dict(zip(names, torch._foreach_mul(vs, factor)))


def tree_add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    """``{k: a[k] + b[k]}`` (keys of ``a``) as one multi-tensor op; bit-identical to the per-leaf sum."""
    names = list(a)
    xs, ys = leaves(a, names), leaves(b, names)
    if not foreach_ok(xs, ys):
        return {k: x + y for k, x, y in zip(names, xs, ys)}
    return dict(zip(names, torch._foreach_add(xs, ys)))
