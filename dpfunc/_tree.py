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
