"""Secure aggregation across processes: a transport-neutral server driver and site handler.

The server side, :class:`RemoteSecureAggregator`, is a :class:`~dpfunc.federated.Aggregator` that runs the
four stages as four round trips through a ``channel``; the site side, :func:`site_handle`, answers one
stage per call from a private ``store`` (the site's own storage between messages). Both speak the flat
records of :mod:`dpfunc.secagg.codec`, so any engine carries them (Flower: ``query.secagg`` messages with a
``ConfigRecord``; the store is the ClientApp's ``context.state``). No engine import here.

One federated round with secure aggregation::

    site (train)   update_s = site_round(...);  site_keep_input(update_s, global, store_s)  # nothing sent
    server         aggregate(updates, global):     # updates carry site ids and round only, never params
        stage 0    channel({s: begin})            -> AdvertiseKeys         (sites that answer: U1)
        stage 1    channel({s: directory})        -> ShareKeys             (U2)
        stage 2    channel({s: inbox_s})          -> MaskedInput           (U3: the sum covers these)
        stage 3    channel({s: survivors})        -> UnmaskShares          (U4 ≥ t)
        mean       = global + decode(Σ masked − masks) / Σ w_s

A site missing from a stage's replies has dropped; fewer than ``threshold`` at any stage raises
:class:`~dpfunc.secagg.federated.SecureAggregationFailed` (nothing is applied).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence

import numpy as np
import torch

from dpfunc.secagg import codec
from dpfunc.secagg.ring import check_sum_fits
from dpfunc.secagg.federated import SecureAggregationFailed, SecureAggregator, _layout, encode_site
from dpfunc.secagg.round import RoundStats
from dpfunc.secagg.server import (server_advertise, server_init, server_masked_input, server_share_keys,
                                  server_unmask)
from dpfunc.secagg.site import site_advertise, site_masked_input, site_share_keys, site_unmask
from dpfunc.secagg.types import ProtocolError, RoundFailedError, SecAggConfig, Stage

__all__ = ["RemoteSecureAggregator", "site_keep_input", "site_handle", "Channel"]

Channel = Callable[[Mapping[int, dict]], Mapping[int, dict]]
"""``channel({site: request record}) -> {site: reply record}``; sites that do not answer are left out."""

_INPUT, _META, _STATE = "secagg-input", "secagg-meta", "secagg-state"


def site_keep_input(update, reference: Mapping[str, torch.Tensor], store: MutableMapping[str, bytes], *,
                    aggregator: SecureAggregator | None = None) -> None:
    """At the site, after local training: encode the update for secure aggregation and keep it in the
    site's ``store`` (nothing leaves the site here). ``aggregator`` must carry the server's encoding options
    (``report_train_loss`` included: without it no loss slot is encoded)."""
    agg = aggregator if aggregator is not None else SecureAggregator()
    vec = encode_site(agg, update, reference, _layout(reference))
    store[_INPUT] = vec.tobytes()
    store[_META] = json.dumps({"site": int(update.site), "round": int(update.round), "length": int(vec.size),
                               "bits": vec.dtype.itemsize * 8, "encoding": _encoding(agg)}).encode()
    store.pop(_STATE, None)


def _encoding(agg: SecureAggregator) -> str:
    """The encoding parameters, which the server and the sites must share (loss_clip is null without the
    loss slots: ``report_train_loss=False``)."""
    return json.dumps([agg.update_fp.clip, agg.update_fp.bits, agg.max_weight,
                       agg.loss_fp.clip if agg.report_train_loss else None])


def site_handle(request: Mapping, store: MutableMapping[str, bytes]) -> dict:
    """Answer one stage at the site. ``request`` is a record from the server; the reply a record.

    Raises :class:`ProtocolError` (the engine reports it as the site's error) for a request out of
    order, for another round, or without a kept input.
    """
    kind = request.get("kind")
    if _META not in store or _INPUT not in store:
        raise ProtocolError("site_handle: this site holds no input for secure aggregation (train first)")
    meta = json.loads(bytes(store[_META]).decode())
    if kind == "begin":
        if meta.get("begun"):
            # A second run over the same input would let a server difference two sums with different
            # survivor sets (x_u = sum1 − sum2): each kept input enters at most one protocol run.
            raise ProtocolError("site_handle: this input was already offered to a secure-aggregation run; "
                                "it is never masked twice (train again for a new round)")
        r, n = int(request["round"]), int(request["vector_length"])
        if r != meta["round"] or n != meta["length"]:
            raise ProtocolError(f"site_handle: the server asks for round {r} with {n} entries; this site "
                                f"holds round {meta['round']} with {meta['length']}")
        if str(request.get("encoding")) != meta["encoding"]:
            raise ProtocolError(f"site_handle: the server's encoding {request.get('encoding')} differs from the "
                                f"one this site used {meta['encoding']} (delta_clip, precision_bits, max_weight, loss_clip)")
        nb = int(request["neighbours"])
        cfg = SecAggConfig(threshold=int(request["threshold"]), vector_length=n, ring_bits=int(request["ring_bits"]),
                           neighbours=None if nb < 0 else nb)
        if cfg.ring.dtype.itemsize * 8 != meta["bits"]:
            raise ProtocolError(f"site_handle: ring of {cfg.ring_bits} bits does not match the kept input")
        state, msg = site_advertise(cfg, site_id=meta["site"], round_id=r, secret=os.urandom(32))
        store[_META] = json.dumps(dict(meta, begun=True)).encode()
    else:
        if _STATE not in store:
            raise ProtocolError(f"site_handle: {kind!r} before the key advertisement of this round")
        state = codec.site_state_from_bytes(bytes(store[_STATE]))
        if kind == "directory":
            state, msg = site_share_keys(state, codec.decode(dict(request)))
        elif kind == "inbox":
            vec = np.frombuffer(bytes(store[_INPUT]), dtype=state.config.ring.dtype).copy()
            state, msg = site_masked_input(state, codec.decode_inbox(dict(request)), vec)
        elif kind == "unmask_request":
            state, msg = site_unmask(state, codec.decode(dict(request)))
        else:
            raise ProtocolError(f"site_handle: unknown request kind {kind!r}")
    store[_STATE] = codec.site_state_to_bytes(state)
    if kind == "unmask_request":   # the round is over for this site: forget its secrets and input
        for k in (_STATE, _INPUT, _META):
            store.pop(k, None)
    return codec.encode(msg, ring_bits=state.config.ring_bits)


def _record_bytes(rec: Mapping) -> int:
    total = 0
    for v in rec.values():
        items = v if isinstance(v, (list, tuple)) else [v]
        for x in items:
            total += len(x) if isinstance(x, (bytes, bytearray)) else 8 if isinstance(x, int) else len(str(x))
    return total


class RemoteSecureAggregator(SecureAggregator):
    """:class:`SecureAggregator` whose sites live in other processes, reached through ``channel``.

    The updates given to :meth:`aggregate` only name the sites and the round (their params are not used
    and need not be real: the sites kept their updates, see :func:`site_keep_input`). The encoding options
    must be the ones the sites used (the defaults on both sides).
    """

    def __init__(self, channel: Channel, **options):
        super().__init__(**options)
        if not callable(channel):
            raise TypeError(f"RemoteSecureAggregator: channel must be callable, got {channel!r}")
        self.channel = channel

    def _ask(self, requests: Mapping[int, dict], decode, sent: dict, received: dict) -> dict:
        for s, req in requests.items():
            received[s] = received.get(s, 0) + _record_bytes(req)
        replies = self.channel(dict(requests)) if requests else {}
        out = {}
        for s, rec in replies.items():
            if s not in requests:
                continue
            sent[s] = sent.get(s, 0) + _record_bytes(rec)
            try:
                msg = decode(rec)
            except ProtocolError:
                continue   # an unreadable reply counts as a dropout
            if getattr(msg, "site_id", s) == s:
                out[s] = msg
        return out

    def aggregate(self, updates: Sequence, reference: Mapping[str, torch.Tensor]) -> dict:
        from dpfunc.federated.aggregate import AggregationError

        if not updates:
            raise AggregationError("RemoteSecureAggregator.aggregate: no updates to aggregate")
        sites = sorted(int(u.site) for u in updates)
        n = len(sites)
        if n < 2:
            raise SecureAggregationFailed(
                "RemoteSecureAggregator.aggregate: secure aggregation needs at least 2 sites; the round is not applied",
                RoundFailedError("one site", stage=Stage.ADVERTISE_KEYS, available=n, needed=2))
        try:
            check_sum_fits(self._encodings(), max_sites=n, ring=self.ring)
        except ValueError as e:
            raise ValueError(f"RemoteSecureAggregator.aggregate: {e}") from None
        layout = _layout(reference)
        round_id = int(updates[0].round)
        cfg = self.config_for(n, layout.size + self.tail_size())
        sent, received = {}, {}
        try:
            srv = server_init(cfg, round_id=round_id, graph_seed=os.urandom(32))
            begin = {"kind": "begin", "round": round_id, "threshold": cfg.threshold, "vector_length": cfg.vector_length,
                     "ring_bits": cfg.ring_bits, "neighbours": -1 if cfg.neighbours is None else cfg.neighbours,
                     "encoding": _encoding(self)}
            msgs = self._ask({s: begin for s in sites}, codec.decode, sent, received)
            srv, directory = server_advertise(srv, msgs)
            rec = codec.encode(directory)
            msgs = self._ask({s: rec for s in directory.keys}, codec.decode, sent, received)
            srv, inboxes = server_share_keys(srv, msgs)
            msgs = self._ask({s: codec.encode_inbox(box) for s, box in inboxes.items()}, codec.decode, sent, received)
            srv, request = server_masked_input(srv, msgs)
            rec = codec.encode(request)
            msgs = self._ask({s: rec for s in request.survivors}, codec.decode, sent, received)
            srv, result = server_unmask(srv, msgs)
        except RoundFailedError as e:
            raise SecureAggregationFailed(
                f"RemoteSecureAggregator.aggregate: round {round_id} failed at stage {e.stage.name} "
                f"({e.available} < threshold {e.needed}); nothing is applied: {e}", e) from e
        return self._finish(result, reference, layout, round_id, cfg.threshold, RoundStats(sent, received, {}, 0.0))
