"""Segmentation post-processing: the largest connected component against a breadth-first-search oracle."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc.segmentation import largest_component


def _components_bfs(mask: torch.Tensor) -> list[set[tuple[int, ...]]]:
    """Every connected component (face, edge and corner neighbours) by breadth-first search over the voxels."""
    fg = {tuple(i) for i in torch.nonzero(mask).tolist()}
    steps = [d for d in itertools.product((-1, 0, 1), repeat=mask.dim()) if any(d)]
    seen, comps = set(), []
    for start in sorted(fg):
        if start in seen:
            continue
        comp, todo = {start}, deque([start])
        seen.add(start)
        while todo:
            v = todo.popleft()
            for d in steps:
                w = tuple(a + b for a, b in zip(v, d))
                if w in fg and w not in seen:
                    seen.add(w)
                    comp.add(w)
                    todo.append(w)
        comps.append(comp)
    return comps


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.0, 0.7),
       shape=st.sampled_from([(9,), (6, 7), (3, 5, 6), (4, 4, 4)]))
def test_largest_component_equals_the_bfs_oracle(seed, density, shape):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(shape, generator=g) < density).long()
    got = largest_component(mask)
    assert got.shape == mask.shape and got.dtype == mask.dtype
    comps = _components_bfs(mask)
    if not comps:
        assert int(got.sum()) == 0
        return
    biggest = max(len(c) for c in comps)
    # the tie rule: among the largest, the component holding the largest flat index (lexicographic max here)
    expected = max((c for c in comps if len(c) == biggest), key=max)
    assert {tuple(i) for i in torch.nonzero(got).tolist()} == expected


def test_largest_component_edge_cases_and_errors():
    empty = torch.zeros(3, 4, 4, dtype=torch.int64)
    assert torch.equal(largest_component(empty), empty)
    two = torch.zeros(1, 8, 8, dtype=torch.int64)
    two[0, :3, :3] = 1           # 9 voxels
    two[0, 6:, 6:] = 1           # 4 voxels, far away
    two[0, 3, 3] = 0
    kept = largest_component(two)
    assert int(kept.sum()) == 9 and int(kept[0, 6:, 6:].sum()) == 0
    diagonal = torch.eye(5, dtype=torch.int64)  # corner neighbours connect
    assert torch.equal(largest_component(diagonal), diagonal)
    with pytest.raises(ValueError, match="largest_component: mask must be a binary mask"):
        largest_component(torch.full((3, 3), 2))
    with pytest.raises(ValueError, match="largest_component: mask must be a 1-, 2- or 3-D tensor"):
        largest_component(torch.zeros(1, 1, 2, 2))
