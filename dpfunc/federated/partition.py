"""Splitting one labelled data set into sites (for simulation: real hospitals bring their own data)."""

from __future__ import annotations

import enum

import numpy as np
import torch

from dpfunc._validate import check_int_range, check_positive_finite
from dpfunc.keys import Key

__all__ = ["Partition", "partition_indices"]


class Partition(enum.Enum):
    """``IID``: a uniform random split; ``DIRICHLET``: label skew, each class split across sites by
    proportions drawn from Dir(α·1) (Hsu, Qi, Brown 2019); small α → sites dominated by one class."""

    IID = "iid"
    DIRICHLET = "dirichlet"


def partition_indices(key: Key, labels: torch.Tensor, num_sites: int, scheme: Partition | str = Partition.IID, *,
                      alpha: float = 0.5, min_size: int = 10) -> list[torch.Tensor]:
    """Disjoint index sets, one per site, covering every example once.

    Args:
        key: the partition's key (same key, same split).
        labels: ``(N,)`` integer labels.
        num_sites: S ≥ 1.
        scheme: :class:`Partition` (or its value ``"iid"`` / ``"dirichlet"``).
        alpha: Dirichlet concentration (> 0), used by ``DIRICHLET``.
        min_size: redraw a Dirichlet split until every site has at least this many examples
            (at most 100 draws, then a ValueError).

    Returns:
        ``S`` sorted int64 index tensors.

    Example:
        >>> parts = partition_indices(Key(0), torch.tensor([0, 1] * 10), 2)
        >>> sorted(torch.cat(parts).tolist()) == list(range(20))
        True
    """
    fn = "partition_indices"
    check_int_range(fn, "num_sites", num_sites, low=1)
    try:
        scheme = Partition(scheme.value if isinstance(scheme, Partition) else scheme)
    except ValueError:
        raise ValueError(f"{fn}: scheme must be one of {[p.value for p in Partition]}, got {scheme!r}") from None
    n = int(labels.shape[0])
    if n < num_sites:
        raise ValueError(f"{fn}: {n} examples cannot fill num_sites={num_sites} sites")
    if scheme is Partition.IID:
        perm = torch.randperm(n, generator=key.generator())
        return [torch.sort(chunk).values for chunk in torch.tensor_split(perm, num_sites)]
    check_positive_finite(fn, "alpha", alpha)
    check_int_range(fn, "min_size", min_size, low=0)
    y = labels.cpu().numpy()
    for attempt in range(100):
        rng = np.random.default_rng(key.fold_in(attempt).state)
        sites: list[list[int]] = [[] for _ in range(num_sites)]
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for s, part in enumerate(np.split(idx, cuts)):
                sites[s].extend(part.tolist())
        if min(len(s) for s in sites) >= min_size:
            return [torch.tensor(sorted(s), dtype=torch.int64) for s in sites]
    raise ValueError(f"{fn}: no Dirichlet(alpha={alpha}) split with every site >= {min_size} examples in 100 draws; "
                     f"raise alpha or lower min_size")
