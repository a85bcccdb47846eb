"""Secure aggregation as a :class:`dpfunc.federated.Aggregator`: the server learns only sums.

What each site puts into the protocol (one vector in Z_{2^k}, all of it masked)::

    ω_s    = w_s / max_weight                       (w_s: the FedAvg weight, an integer example count)
    [ q(ω_s · (params_s − global)) ,                 P entries,  FixedPoint(delta_clip, precision_bits)
      w_s ,                                          1 entry,    exact integer
      q(ω_s · loss_s) , w_s or 0                     2 entries,  ONLY with report_train_loss=True (see below)
      1 if any coordinate of the delta was clipped ] 1 entry,    exact integer

The server unmasks the sums only and computes ``global + max_weight · Σ q(ω_s δ_s) / Σ w_s`` — the
weighted FedAvg mean — and the number of sites whose update was clipped. Only participation (who sent
masked input) is in the clear.

The raw training loss is a statistic of the site's data outside its (ε, δ). By default
(``report_train_loss=False``) the vector has no slot for it: nothing derived from the loss is encoded,
whatever ``SiteUpdate.loss`` holds, and :attr:`SecureRoundInfo.mean_loss` is None (never a 0 that reads
as a loss). With ``report_train_loss=True`` (``dpfunc federated --report-train-loss``, debugging) two
slots carry ``q(ω_s·loss_s)`` and ``w_s`` from each site that reports a loss (zeros from one that does
not, e.g. a Flower site whose node config does not consent), and ``mean_loss`` is the weighted mean over
the reporting sites (None if none did). Server and sites must agree on the option: it is part of the
encoding they compare (:mod:`dpfunc.secagg.remote`).

Accuracy (no site clipped): per coordinate, ``|secure − plain| ≤ n · scale / 2 · max_weight / Σ w_s``
(``scale = delta_clip / (2**(precision_bits−1) − 1)``), plus the float32 rounding of the final cast;
:meth:`SecureAggregator.error_bound` returns it. The ring is checked to hold the sum of ``n`` sites at
every round (``n · M ≤ 2**(k−1) − 1``), so it cannot wrap.

In process (:func:`dpfunc.federated.run_round_inprocess`) the sites' stage functions run in the server's
process: the protocol and its arithmetic are exercised exactly, but there is no separation of parties
there (the in-process runner's own report sees every update); the guarantee holds over a real transport.

Example:
    >>> import torch
    >>> from dpfunc.federated import SiteUpdate
    >>> agg = SecureAggregator(delta_clip=1.0, precision_bits=20, max_weight=100)
    >>> ref = {"w": torch.zeros(2)}
    >>> ups = [SiteUpdate(s, 0, {"w": torch.tensor([0.1 * (s + 1), -0.2])}, 10.0 * (s + 1), 1, 0.5) for s in range(3)]
    >>> [round(v, 4) for v in agg.aggregate(ups, ref)["w"].tolist()]
    [0.2333, -0.2]
    >>> agg.last_round.included, agg.last_round.total_weight
    ((0, 1, 2), 60)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional

import numpy as np
import torch

from dpfunc._validate import check_int_range, check_positive_finite
from dpfunc.federated.aggregate import AggregationError
from dpfunc.federated.site import SiteUpdate
from dpfunc.secagg import _primitives as P
from dpfunc.secagg.ring import FixedPoint, Ring, check_sum_fits
from dpfunc.secagg.round import RoundStats, run_round
from dpfunc.secagg.types import RoundFailedError, SecAggConfig, Stage

__all__ = ["SecureAggregator", "SecureRoundInfo", "SecureAggregationFailed", "encode_site", "decode_sum"]


class SecureAggregationFailed(AggregationError):
    """The protocol could not finish (fewer than ``threshold`` sites or shares): nothing is applied.

    ``cause`` is the :class:`dpfunc.secagg.RoundFailedError` (stage, available, needed)."""

    def __init__(self, message: str, cause: RoundFailedError):
        super().__init__(message)
        self.cause = cause


class SecureRoundInfo(NamedTuple):
    """What the server learned in a round: participation, sums, and the accuracy bound."""

    round: int
    included: tuple            # sites whose masked input is in the sum (U3)
    total_weight: int          # Σ w_s
    mean_loss: Optional[float]  # None unless report_train_loss: Σ w_s loss_s / Σ w_s over reporting sites (NOT private)
    sites_clipped: int         # how many sites had at least one delta coordinate clipped
    error_bound: float         # per-coordinate bound |secure − plain| when sites_clipped == 0
    threshold: int
    stats: RoundStats

    def to_record(self, asked: Sequence[int]) -> dict:
        """The round as a JSON record for the job history — only what the server saw anyway: who was asked
        to aggregate (the sites whose training answers were usable), who is in the sum and who dropped
        during the protocol, the threshold, the unmasked sums' metadata, and the payload bytes it relayed."""
        record = {"included": [int(s) for s in self.included], "dropped": [int(s) for s in asked if s not in self.included],
                  "threshold": int(self.threshold), "sites_clipped": int(self.sites_clipped),
                  "total_weight": int(self.total_weight), "error_bound": float(self.error_bound),
                  "bytes_sent": int(sum(self.stats.sent.values())),
                  "bytes_received": int(sum(self.stats.received.values()))}
        if self.mean_loss is not None:  # only with report_train_loss, and only if some site reported one
            record["mean_loss"] = float(self.mean_loss)
        return record


class _Layout(NamedTuple):
    names: tuple
    shapes: tuple
    size: int


def _layout(reference: Mapping[str, torch.Tensor]) -> _Layout:
    names = tuple(reference)
    shapes = tuple(tuple(reference[k].shape) for k in names)
    return _Layout(names, shapes, sum(int(math.prod(s)) for s in shapes))


class SecureAggregator:
    """Weighted FedAvg through the Bonawitz / SecAgg+ protocol of :mod:`dpfunc.secagg`.

    Registered in :data:`dpfunc.federated.AGGREGATORS` as ``"secagg"`` (``dpfunc federated
    --secure-aggregation``).

    Args:
        delta_clip: range of each coordinate of a site's update ``params_s − global`` (after weighting by
            ``ω_s ≤ 1``); larger values are clipped and counted (a warning names how many sites).
        precision_bits: signed precision of the fixed-point encoding (2..62).
        ring_bits: ``k`` of Z_{2^k}; must hold the sum of all sites (checked each round). The defaults
            (26 bits in a 32-bit ring, ``max_weight`` 8192) admit up to 64 sites (:meth:`max_sites`).
        max_weight: the largest FedAvg weight (example count) of any site; weights must be integers in
            ``[1, max_weight]``. Keep it close to the largest site: the bound grows with
            ``max_weight / Σ w_s``.
        loss_clip: range of the (weighted) training loss aggregated alongside (``report_train_loss`` only).
        threshold: ``t``; default a strict majority of a neighbourhood (``n // 2 + 1`` on the complete
            graph of ``n`` sites, ``(neighbours + 1) // 2 + 1`` with SecAgg+; at least 2).
        neighbours: SecAgg+ degree (even) or ``None`` for the complete graph.
        dropouts: test/simulation hook ``{round: {Stage: sites}}``: those sites stop answering from that
            stage of that round on.
        seed: 32 bytes to replay the protocol's randomness (tests); default fresh ``os.urandom`` per round.
        report_train_loss: add the two loss slots (see the module docstring); default False: nothing derived
            from a site's raw training loss is encoded, and ``last_round.mean_loss`` is None.
    """

    def __init__(self, *, delta_clip: float = 1.0, precision_bits: int = 26, ring_bits: int = 32,
                 max_weight: int = 8192, loss_clip: float = 100.0, threshold: Optional[int] = None,
                 neighbours: Optional[int] = None,
                 dropouts: Optional[Mapping[int, Mapping[Stage, Sequence[int]]]] = None,
                 seed: Optional[bytes] = None, report_train_loss: bool = False):
        fn = "SecureAggregator"
        if not isinstance(report_train_loss, bool):
            raise TypeError(f"{fn}: report_train_loss must be a bool, got {type(report_train_loss).__name__} "
                            f"{report_train_loss!r}")
        self.report_train_loss = report_train_loss
        self.update_fp = FixedPoint(check_positive_finite(fn, "delta_clip", delta_clip),
                                    check_int_range(fn, "precision_bits", precision_bits, low=2, high=62))
        self.loss_fp = FixedPoint(check_positive_finite(fn, "loss_clip", loss_clip), precision_bits)
        self.max_weight = check_int_range(fn, "max_weight", max_weight, low=1, high=(1 << 53))
        self.weight_fp = FixedPoint.integer(self.max_weight)
        self.flag_fp = FixedPoint.integer(1)
        self.ring = Ring(check_int_range(fn, "ring_bits", ring_bits, low=2, high=64))
        check_sum_fits(self._encodings(), max_sites=2, ring=self.ring)   # refuse hopeless configs early
        self.threshold = None if threshold is None else check_int_range(fn, "threshold", threshold, low=2)
        if neighbours is not None:
            SecAggConfig(threshold=2, vector_length=1, neighbours=neighbours)  # validates it
        self.neighbours = neighbours
        self.dropouts = {int(r): {Stage(s): frozenset(v) for s, v in d.items()} for r, d in (dropouts or {}).items()}
        if seed is not None and (not isinstance(seed, (bytes, bytearray)) or len(seed) != 32):
            raise ValueError(f"{fn}: seed must be 32 bytes or None, got {seed!r:.40}")
        self.seed = None if seed is None else bytes(seed)
        self.last_round: Optional[SecureRoundInfo] = None

    def _encodings(self):
        """The encodings of the vector's entries after the P update coordinates (the tail), in order."""
        if self.report_train_loss:
            return (self.update_fp, self.weight_fp, self.loss_fp, self.weight_fp, self.flag_fp)
        return (self.update_fp, self.weight_fp, self.flag_fp)

    def tail_size(self) -> int:
        """Entries after the P update coordinates: weight, [loss, loss weight,] clipped flag."""
        return len(self._encodings()) - 1

    def max_sites(self) -> int:
        """The most sites one round can sum without wrapping the ring."""
        limit = (1 << (self.ring.bits - 1)) - 1
        return min(limit // e.max_int for e in self._encodings())

    def error_bound(self, n_sites: int, total_weight: float) -> float:
        """Per-coordinate bound on ``|secure mean − plain mean|`` (float64, before the final cast)."""
        return n_sites * self.update_fp.scale / 2 * self.max_weight / total_weight

    def config_for(self, n_sites: int, vector_length: int) -> SecAggConfig:
        group = n_sites if self.neighbours is None else min(n_sites, self.neighbours + 1)
        t = self.threshold if self.threshold is not None else max(2, group // 2 + 1)
        return SecAggConfig(threshold=t, vector_length=vector_length, ring_bits=self.ring.bits,
                            neighbours=self.neighbours)

    def aggregate(self, updates: Sequence[SiteUpdate], reference: Mapping[str, torch.Tensor]) -> dict:
        if not updates:
            raise AggregationError("SecureAggregator.aggregate: no updates to aggregate")
        n = len(updates)
        if n < 2:
            raise SecureAggregationFailed(
                "SecureAggregator.aggregate: secure aggregation needs at least 2 sites (one site's sum is its "
                "update); the round is not applied",
                RoundFailedError("one site", stage=Stage.ADVERTISE_KEYS, available=n, needed=2))
        try:
            check_sum_fits(self._encodings(), max_sites=n, ring=self.ring)
        except ValueError as e:
            raise ValueError(f"SecureAggregator.aggregate: {e}") from None
        layout = _layout(reference)
        round_id = int(updates[0].round)
        inputs = {int(u.site): encode_site(self, u, reference, layout) for u in updates}
        cfg = self.config_for(n, layout.size + self.tail_size())
        secrets = graph_seed = None
        if self.seed is not None:
            secrets = {s: P.hkdf(self.seed, b"site" + round_id.to_bytes(8, "big") + s.to_bytes(8, "big"))
                       for s in inputs}
            graph_seed = P.hkdf(self.seed, b"graph" + round_id.to_bytes(8, "big"))
        try:
            result, stats = run_round(cfg, inputs, round_id=round_id, dropouts=self.dropouts.get(round_id),
                                      secrets=secrets, graph_seed=graph_seed)
        except RoundFailedError as e:
            raise SecureAggregationFailed(
                f"SecureAggregator.aggregate: round {round_id} failed at stage {e.stage.name} "
                f"({e.available} < threshold {e.needed}); nothing is applied: {e}", e) from e
        return self._finish(result, reference, layout, round_id, cfg.threshold, stats)

    def _finish(self, result, reference, layout, round_id: int, threshold: int, stats: RoundStats) -> dict:
        mean, info = decode_sum(self, result.total, reference, layout)
        self.last_round = SecureRoundInfo(round_id, result.included, info["total_weight"], info["mean_loss"],
                                          info["sites_clipped"],
                                          self.error_bound(len(result.included), info["total_weight"]),
                                          threshold, stats)
        if info["sites_clipped"]:
            warnings.warn(f"SecureAggregator: round {round_id}: {info['sites_clipped']} site(s) had update "
                          f"coordinates beyond delta_clip={self.update_fp.clip} (clipped); raise delta_clip",
                          RuntimeWarning, stacklevel=3)
        return mean

    def __repr__(self) -> str:
        return (f"SecureAggregator(delta_clip={self.update_fp.clip}, precision_bits={self.update_fp.bits}, "
                f"ring_bits={self.ring.bits}, max_weight={self.max_weight}, threshold={self.threshold}, "
                f"neighbours={self.neighbours}, report_train_loss={self.report_train_loss})")


def encode_site(agg: SecureAggregator, update: SiteUpdate, reference: Mapping[str, torch.Tensor],
                layout: _Layout) -> np.ndarray:
    """One site's protocol input (ring elements), computed at the site from its own update.

    ``update.loss`` enters only when ``agg.report_train_loss`` is set and the loss is finite (a site that
    did not opt in has NaN there); otherwise the vector has no loss slot, or zeros in it."""
    w = update.weight
    if not (float(w).is_integer() and 1 <= w <= agg.max_weight):
        raise ValueError(f"SecureAggregator: weight of site {update.site} must be an integer in "
                         f"[1, max_weight={agg.max_weight}], got {w!r}")
    omega = float(w) / agg.max_weight
    delta = np.concatenate([(update.params[k].detach().to(torch.float64) - reference[k].detach().to(torch.float64))
                            .reshape(-1).numpy() for k in layout.names]) if layout.size else np.zeros(0)
    q_delta, clipped = agg.update_fp.encode(omega * delta)
    tail = [int(w)]
    if agg.report_train_loss:
        reported = math.isfinite(update.loss)
        q_loss, _ = agg.loss_fp.encode(np.array([omega * float(update.loss) if reported else 0.0]))
        tail += [int(q_loss[0]), int(w) if reported else 0]
    tail.append(1 if clipped else 0)
    return agg.ring.from_signed(np.concatenate([q_delta, np.array(tail, dtype=np.int64)]))


def decode_sum(agg: SecureAggregator, total: np.ndarray, reference: Mapping[str, torch.Tensor],
               layout: _Layout) -> tuple[dict, dict]:
    """The weighted mean model and the aggregate metrics from the unmasked ring sum."""
    s = agg.ring.to_signed(total)
    total_weight = int(s[layout.size])
    if total_weight < 1:
        raise AggregationError(f"SecureAggregator: the aggregate weight is {total_weight} (corrupted sum)")
    mean_delta = agg.update_fp.decode(s[:layout.size]) * (agg.max_weight / total_weight)
    out, off = {}, 0
    for name, shape in zip(layout.names, layout.shapes):
        size = int(math.prod(shape))
        ref = reference[name]
        d = torch.from_numpy(mean_delta[off:off + size].reshape(shape))
        out[name] = (ref.detach().to(torch.float64) + d).to(ref.dtype)
        off += size
    mean_loss = None
    if agg.report_train_loss:
        loss_weight = int(s[layout.size + 2])
        if loss_weight > 0:
            mean_loss = float(agg.loss_fp.decode(s[layout.size + 1:layout.size + 2])[0] * agg.max_weight / loss_weight)
    info = {"total_weight": total_weight, "mean_loss": mean_loss, "sites_clipped": int(s[layout.size + agg.tail_size() - 1])}
    return out, info

