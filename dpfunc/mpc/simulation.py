"""In-process two-party simulation: the dealer and both parties in threads over queues.

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


from dpfunc.keys import Key
from dpfunc.mpc.context import (
    DEALER,
    DEFAULT_CHUNK_BYTES,
    CommStats,
    Context,
    DealerSource,
    MaterialQueue,
    MaterialStream,
    QueueAborted,
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
        peak_material_bytes: streaming: the most bytes of material held at once for party 0 and for
            party 1 (chunks queued plus the one being read; :class:`MaterialQueue`); without
            streaming, the whole material.
        dealer_peak_pending_bytes: the largest chunk the dealer built (bytes per party).
    """

    outputs: tuple[Any, Any]
    stats: tuple[CommStats, CommStats]
    dealer_bytes: tuple[int, int]
    transcripts: tuple[list, list] | None
    peak_material_bytes: tuple[int, int] = (0, 0)
    dealer_peak_pending_bytes: int = 0


def run_dealer(program: Callable[[Context], Any], key: Key, fp: FixedPoint = FixedPoint()) -> DealerSource:
    """The dealer's run, all at once: ``program`` on a dealer context (no channel, no inputs); returns
    its material (held whole: the oracle for the streamed form, and for tests of the dealer)."""
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
    stream: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    queue_chunks: int = 1,
) -> SimulationResult:
    """Run ``program`` as the dealer and as parties 0 and 1, each in its own thread.

    Args:
        program: ``ctx -> output``; must branch only on public data (``ctx.rank``, shapes).
        dealer_key: the dealer's own key (all correlated randomness comes from it).
        fp: fixed-point encoding.
        timeout: seconds a party waits for a message before failing (no hang).
        record: keep each party's received messages (for view tests).
        stream: the dealer runs alongside the parties and hands out its material in chunks of about
            ``chunk_bytes`` through queues of ``queue_chunks`` chunks (bounded memory). ``False``:
            the dealer's whole material is made first and held (the original form; same bytes, so
            bit-identical results).

    Raises:
        RuntimeError: a party or the dealer failed (its exception is chained), or a party did not
            consume exactly the dealer's material.
        TimeoutError: a party did not finish within ``timeout``.
    """
    ch0, ch1 = queue_channel_pair(timeout)
    dealer_peak = 0
    if stream:
        queues = [MaterialQueue(queue_chunks, timeout), MaterialQueue(queue_chunks, timeout)]
        source = DealerSource(dealer_key, sink=lambda r, chunk: queues[r].put(chunk), chunk_bytes=chunk_bytes)
        streams = [MaterialStream(next_chunk=q.get) for q in queues]
    else:
        whole = run_dealer(program, dealer_key, fp)
        dealer_peak = whole.peak_pending_bytes
        streams = [MaterialStream(whole.flat(0)), MaterialStream(whole.flat(1))]
        del whole
    ctxs = [
        Context(r, ch, streams[r], fp, transcript=[] if record else None)
        for r, ch in ((0, ch0), (1, ch1))
    ]
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None, None]

    def run(r: int) -> None:
        try:
            if r == DEALER:
                program(Context(DEALER, None, source, fp))
                source.finish()
            else:
                results[r] = program(ctxs[r])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors[r] = e
            for ch in (ch0, ch1):  # the other party stops waiting for this one's messages now, not at the timeout
                ch.abort()
            if stream:  # the others stop waiting for (or on) this thread now
                for q in queues:
                    q.abort()

    threads = {r: threading.Thread(target=run, args=(r,), daemon=True) for r in ((0, 1, DEALER) if stream else (0, 1))}
    for t in threads.values():
        t.start()

    def check(ranks) -> None:
        for r in ranks:
            threads[r].join(timeout)
            if threads[r].is_alive():
                raise TimeoutError(f"simulate: {'the dealer' if r == DEALER else f'party {r}'} did not finish within {timeout}s")
        # the first cause: a dealer failure explains the parties', and an aborted wait is a consequence
        failed = sorted((r for r in (DEALER, 0, 1) if errors[r] is not None),
                        key=lambda r: isinstance(errors[r], QueueAborted))
        if failed:
            r = failed[0]
            raise RuntimeError(f"simulate: {'the dealer' if r == DEALER else f'party {r}'} failed: {errors[r]}") from errors[r]

    check((0, 1))
    for r, ctx in enumerate(ctxs):
        if not ctx.source.exhausted:
            raise RuntimeError(f"simulate: party {r} did not consume all of the dealer's material")
    if stream:
        check((DEALER,))
    if stream:
        peaks = (queues[0].peak_held_bytes, queues[1].peak_held_bytes)
        dealer_peak = source.peak_pending_bytes
    else:
        peaks = (streams[0].bytes_received, streams[1].bytes_received)
    return SimulationResult(
        outputs=(results[0], results[1]),
        stats=(ctxs[0].stats, ctxs[1].stats),
        dealer_bytes=(streams[0].bytes_received, streams[1].bytes_received),
        transcripts=(ctxs[0].transcript, ctxs[1].transcript) if record else None,
        peak_material_bytes=peaks,
        dealer_peak_pending_bytes=dealer_peak,
    )
