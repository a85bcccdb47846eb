"""Who masks with whom: the complete graph (Bonawitz et al. 2017) or a random Harary graph (SecAgg+,
Bell et al. 2020).

``H(d, n)``: place the ``n`` sites on a ring in a random order and join each to the ``d/2`` nearest on
each side (degree ``d``, symmetric, ``d``-connected). The order is ``sort by SHA-256(graph_seed ‖ id)``;
every party computes the same graph from the public roster and seed.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

__all__ = ["build_graph"]


def build_graph(site_ids: Iterable[int], *, degree: Optional[int], graph_seed: bytes) -> dict[int, frozenset]:
    """``{site: its neighbours}`` (never itself). ``degree=None`` or ``≥ n − 1``: complete graph."""
    ids = sorted(set(int(i) for i in site_ids))
    n = len(ids)
    if degree is None or degree >= n - 1:
        everyone = frozenset(ids)
        return {i: everyone - {i} for i in ids}
    order = sorted(ids, key=lambda i: hashlib.sha256(graph_seed + i.to_bytes(8, "big")).digest())
    half = degree // 2
    out = {}
    for pos, i in enumerate(order):
        out[i] = frozenset(order[(pos + off) % n] for off in range(-half, half + 1) if off != 0)
    return out
