"""Small helpers on parameter dicts (``dict[str, Tensor]``, keyed like a state dict)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Params = dict[str, torch.Tensor]


def tree_map(fn: Callable[..., torch.Tensor], tree: Mapping[str, torch.Tensor], *rest: Mapping[str, torch.Tensor]) -> Params:
    """Apply ``fn`` leaf-wise over dicts that share ``tree``'s keys."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def zeros_like(tree: Mapping[str, torch.Tensor]) -> Params:
    return {k: torch.zeros_like(v) for k, v in tree.items()}


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
