"""In-process two-party simulation: the dealer's run, then both parties in threads over queues.

This runs exactly the code the real parties run (:mod:`dpfunc.mpc.parties`), with in-process
channels instead of ``torch.distributed``; tests and the benchmark use it.

Example:
    >>> from dpfunc.mpc import FixedPoint, encode, decode, mul, share_from, reveal_to
    >>> def program(ctx):
    ...     x = share_from(ctx, 1, encode(torch.tensor([1.5])) if ctx.rank == 1 else None, (1,), Key(1))
    ...     w = share_from(ctx, 0, encode(torch.tensor([-2.0])) if ctx.rank == 0 else None, (1,), Key(2))
    ...     return reveal_to(ctx, 1, mul(ctx, x, w))
    >>> out = simulate(program, dealer_key=Key(3))
    >>> decode(out.outputs[1])
    tensor([-3.], dtype=torch.float64)
"""

from __future__ import annotations

import threading
from typing import Any, Callable, NamedTuple

import torch

from dpfunc.keys import Key
from dpfunc.mpc.context import (
    DEALER,
    CommStats,
    Context,
    DealerSource,
    MaterialStream,
    queue_channel_pair,
)
from dpfunc.mpc.ring import FixedPoint

__all__ = ["SimulationResult", "run_dealer", "simulate"]


class SimulationResult(NamedTuple):
    """Outputs and counters of one simulated two-party run.

    Attributes:
        outputs: what ``program`` returned on party 0 and on party 1.
        stats: each party's :class:`CommStats` (online phase).
        dealer_bytes: bytes the dealer sent to party 0 and to party 1 (offline phase).
        transcripts: each party's received tensors, in order (if ``record``).
    """

    outputs: tuple[Any, Any]
    stats: tuple[CommStats, CommStats]
    dealer_bytes: tuple[int, int]
    transcripts: tuple[list, list] | None


def run_dealer(program: Callable[[Context], Any], key: Key, fp: FixedPoint = FixedPoint()) -> DealerSource:
    """The dealer's run: ``program`` on a dealer context (no channel, no inputs); returns its material."""
    source = DealerSource(key)
    program(Context(DEALER, None, source, fp))
    return source


def simulate(
    program: Callable[[Context], Any],
    *,
    dealer_key: Key,
    fp: FixedPoint = FixedPoint(),
    timeout: float = 120.0,
    record: bool = False,
) -> SimulationResult:
    """Run ``program`` as the dealer, then as parties 0 and 1 in two threads.

    Args:
        program: ``ctx -> output``; must branch only on public data (``ctx.rank``, shapes).
        dealer_key: the dealer's own key (all correlated randomness comes from it).
        fp: fixed-point encoding.
        timeout: seconds a party waits for a message before failing (no hang).
        record: keep each party's received messages (for view tests).

    Raises:
        RuntimeError: a party failed (its exception is chained), or did not consume exactly the
            dealer's material.
        TimeoutError: a party did not finish within ``timeout``.
    """
    source = run_dealer(program, dealer_key, fp)
    ch0, ch1 = queue_channel_pair(timeout)
    flats = [source.flat(0), source.flat(1)]
    ctxs = [
        Context(r, ch, MaterialStream(flats[r]), fp, transcript=[] if record else None)
        for r, ch in ((0, ch0), (1, ch1))
    ]
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None]

    def run(r: int) -> None:
        try:
            results[r] = program(ctxs[r])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors[r] = e

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"simulate: a party did not finish within {timeout}s")
    for r, e in enumerate(errors):
        if e is not None:
            raise RuntimeError(f"simulate: party {r} failed: {e}") from e
    for r, ctx in enumerate(ctxs):
        if not ctx.source.exhausted:
            raise RuntimeError(f"simulate: party {r} did not consume all of the dealer's material")
    return SimulationResult(
        outputs=(results[0], results[1]),
        stats=(ctxs[0].stats, ctxs[1].stats),
        dealer_bytes=(flats[0].numel(), flats[1].numel()),
        transcripts=(ctxs[0].transcript, ctxs[1].transcript) if record else None,
    )
