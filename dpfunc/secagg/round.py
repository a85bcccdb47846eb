"""Run one secure-aggregation round in-process: the four stages, with optional dropouts at each.

This is the reference driver (tests, the in-process federated runner, the benchmark). Another transport
(Flower messages) calls the same stage functions in the same order.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping, NamedTuple, Optional

import numpy as np

from dpfunc.secagg.server import (AggregateResult, server_advertise, server_init, server_masked_input,
                                  server_share_keys, server_unmask)
from dpfunc.secagg.site import site_advertise, site_masked_input, site_share_keys, site_unmask
from dpfunc.secagg.types import SecAggConfig, Stage, wire_bytes

__all__ = ["RoundStats", "run_round"]


class RoundStats(NamedTuple):
    """Payload bytes each site sent / received, and CPU seconds per site and on the server."""

    sent: Mapping[int, int]
    received: Mapping[int, int]
    site_seconds: Mapping[int, float]
    server_seconds: float


def run_round(config: SecAggConfig, inputs: Mapping[int, np.ndarray], *, round_id: int = 0,
              dropouts: Optional[Mapping[Stage, frozenset]] = None,
              secrets: Optional[Mapping[int, bytes]] = None,
              graph_seed: Optional[bytes] = None) -> tuple[AggregateResult, RoundStats]:
    """Aggregate ``inputs`` (ring elements per site) with secure aggregation.

    Args:
        inputs: ``{site_id: vector}``, each of ``config.ring.dtype`` and shape ``(vector_length,)``.
        dropouts: ``{stage: sites}``: those sites send nothing from that stage on (a site that drops at
            ``Stage.UNMASK`` sent its masked input, so it is in the sum).
        secrets: ``{site_id: 32 bytes}`` to replay a round; default ``os.urandom(32)`` per site.
        graph_seed: 32 public bytes for the SecAgg+ graph; default random.

    Returns:
        ``(AggregateResult(total, included), RoundStats)``.

    Raises:
        RoundFailedError: fewer than ``threshold`` sites or shares at some stage.

    Example:
        >>> cfg = SecAggConfig(threshold=2, vector_length=3, ring_bits=16)
        >>> xs = {i: np.array([i, 1, 2], dtype=np.uint16) for i in range(3)}
        >>> res, _ = run_round(cfg, xs, dropouts={Stage.MASKED_INPUT: frozenset({2})})
        >>> res.total.tolist(), res.included
        ([1, 2, 4], (0, 1))
    """
    dropouts = {Stage(k): frozenset(v) for k, v in (dropouts or {}).items()}
    gone: set = set()
    sent = {u: 0 for u in inputs}
    received = {u: 0 for u in inputs}
    clock = {u: 0.0 for u in inputs}
    server_clock = 0.0

    def live(stage: Stage, ids) -> list:
        gone.update(dropouts.get(stage, ()))
        return [u for u in sorted(ids) if u not in gone]

    def site(u: int, f: Callable, *args, **kwargs):
        t0 = time.process_time()
        out = f(*args, **kwargs)
        clock[u] += time.process_time() - t0
        sent[u] += wire_bytes(out[1], ring_bits=config.ring_bits)
        return out

    def server(f: Callable, *args, **kwargs):
        nonlocal server_clock
        t0 = time.process_time()
        out = f(*args, **kwargs)
        server_clock += time.process_time() - t0
        return out

    srv = server(server_init, config, round_id=round_id,
                 graph_seed=graph_seed if graph_seed is not None else os.urandom(32))
    states, msgs = {}, {}
    for u in live(Stage.ADVERTISE_KEYS, inputs):
        secret = secrets[u] if secrets is not None else os.urandom(32)
        states[u], msgs[u] = site(u, site_advertise, config, site_id=u, round_id=round_id, secret=secret)
    srv, directory = server(server_advertise, srv, msgs)

    msgs = {}
    for u in live(Stage.SHARE_KEYS, states):
        received[u] += wire_bytes(directory)
        states[u], msgs[u] = site(u, site_share_keys, states[u], directory)
    srv, inboxes = server(server_share_keys, srv, msgs)

    msgs = {}
    for u in live(Stage.MASKED_INPUT, inboxes):
        received[u] += wire_bytes(inboxes[u])
        states[u], msgs[u] = site(u, site_masked_input, states[u], inboxes[u], inputs[u])
    srv, request = server(server_masked_input, srv, msgs)

    msgs = {}
    for u in live(Stage.UNMASK, request.survivors):
        received[u] += wire_bytes(request)
        states[u], msgs[u] = site(u, site_unmask, states[u], request)
    srv, result = server(server_unmask, srv, msgs)
    return result, RoundStats(sent, received, clock, server_clock)
