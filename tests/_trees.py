"""Test helper: every tensor in a nested state, an oracle independent of the library's own tree walkers."""

from __future__ import annotations

import dataclasses

import torch


def tensors_in(tree) -> list[torch.Tensor]:
    """Every tensor anywhere in a nested state (dicts, tuples, lists, NamedTuples, dataclass fields)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors_in(v)]
    if isinstance(tree, (tuple, list)):
        return [t for v in tree for t in tensors_in(v)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [t for f in dataclasses.fields(tree) for t in tensors_in(getattr(tree, f.name))]
    return []
