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


def tree_mul(tree: Mapping[str, torch.Tensor], factor: float) -> Params:
    """``{k: v * factor}`` as ONE multi-tensor op (``torch._foreach_mul``) instead of one op per leaf.

    Element for element the same product as ``v * factor`` (bit-identical); a new dict of new tensors.
    """
    names = list(tree)
    if not names:
        return {}
    return dict(zip(names, torch._foreach_mul(leaves(tree, names), factor)))


def tree_add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Params:
    """``{k: a[k] + b[k]}`` (keys of ``a``) as one multi-tensor op; bit-identical to the per-leaf sum."""
    names = list(a)
    if not names:
        return {}
    return dict(zip(names, torch._foreach_add(leaves(a, names), leaves(b, names))))
