"""Minimum-cost assignment (the Hungarian method) for small square or rectangular cost matrices.

Used to match reconstructed images to originals before scoring them: a reconstruction of a batch
comes back in no particular order, so each reconstruction is paired with the original it resembles
most under the globally cheapest one-to-one pairing.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["linear_sum_assignment"]


def linear_sum_assignment(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a minimum-cost one-to-one assignment.

    Shortest augmenting paths with row/column potentials (Kuhn 1955, Munkres 1957, in the O(n²m)
    form of Jonker & Volgenant 1987). Same contract as ``scipy.optimize.linear_sum_assignment``
    (the oracle the tests compare with): for an ``(n, m)`` matrix, ``min(n, m)`` pairs ``(row[k],
    col[k])``, rows increasing, minimising ``cost[row, col].sum()``.

    Args:
        cost: finite ``(n, m)`` array.

    Returns:
        ``(row_ind, col_ind)`` int64 arrays of length ``min(n, m)``.

    Example:
        >>> linear_sum_assignment(np.array([[4.0, 1.0], [2.0, 0.0]]))
        (array([0, 1]), array([1, 0]))
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"linear_sum_assignment: cost must be a 2-d array, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("linear_sum_assignment: cost must be finite (got NaN or inf entries)")
    transposed = c.shape[0] > c.shape[1]
    if transposed:
        c = c.T
    n, m = c.shape
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # 1-based arrays, index 0 is the virtual start column.
    u = [0.0] * (n + 1)
    v = [0.0] * (m + 1)
    match = [0] * (m + 1)  # match[j] = row assigned to column j (0 = free)
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        match[0] = i
        j0 = 0
        minv = [math.inf] * (m + 1)
        used = [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = c[i0 - 1, j - 1] - u[i0] - v[j]
                    if reduced < minv[j]:
                        minv[j], way[j] = reduced, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # augment along the path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    rows, cols = [], []
    for j in range(1, m + 1):
        if match[j]:
            rows.append(match[j] - 1)
            cols.append(j - 1)
    rows_a, cols_a = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    if transposed:
        rows_a, cols_a = cols_a, rows_a
    order = np.argsort(rows_a, kind="stable")
    return rows_a[order], cols_a[order]
