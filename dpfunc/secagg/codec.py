"""Messages and site state as plain records, for transports that carry bytes (e.g. Flower records).

Every protocol message becomes a flat ``dict`` of ``int``, ``bytes``, ``list[int]`` and ``list[bytes]``
(what a Flower ``ConfigRecord`` holds), and back; a :class:`~dpfunc.secagg.SiteState` becomes bytes that
the site keeps between stages (it holds the site's secrets: it must never leave the site).

Example:
    >>> from dpfunc.secagg import SecAggConfig, site_advertise
    >>> st, msg = site_advertise(SecAggConfig(2, 4), site_id=3, round_id=0, secret=bytes(32))
    >>> decode(encode(msg)) == msg and site_state_from_bytes(site_state_to_bytes(st)) == st
    True
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dpfunc.secagg.types import (AdvertiseKeys, KeyDirectory, MaskedInput, ProtocolError, SecAggConfig, ShareKeys,
                                 Stage, UnmaskRequest, UnmaskShares)
from dpfunc.secagg.ring import Ring
from dpfunc.secagg.site import SiteState
from dpfunc.secagg import shamir

__all__ = ["encode", "decode", "encode_inbox", "decode_inbox", "site_state_to_bytes", "site_state_from_bytes"]


def _shares_out(d) -> tuple[list, list]:
    owners = sorted(d)
    return owners, [shamir.share_to_bytes(d[o]) for o in owners]


def encode(msg: Any, *, ring_bits: int | None = None) -> dict:
    """A protocol message as a flat record with a ``"kind"`` entry. A masked vector is packed at
    ``ring_bits`` bits per entry (:meth:`Ring.pack`; default: its container width)."""
    if isinstance(msg, AdvertiseKeys):
        return {"kind": "advertise", "site": msg.site_id, "cipher_pk": msg.cipher_public, "mask_pk": msg.mask_public}
    if isinstance(msg, KeyDirectory):
        ids = sorted(msg.keys)
        return {"kind": "directory", "round": msg.round_id, "ids": ids, "graph_seed": msg.graph_seed,
                "cipher_pks": [msg.keys[i][0] for i in ids], "mask_pks": [msg.keys[i][1] for i in ids]}
    if isinstance(msg, ShareKeys):
        to = sorted(msg.ciphertexts)
        return {"kind": "share_keys", "site": msg.site_id, "to": to, "ct": [msg.ciphertexts[v] for v in to]}
    if isinstance(msg, MaskedInput):
        v = np.ascontiguousarray(msg.vector)
        ring = Ring(ring_bits if ring_bits is not None else v.dtype.itemsize * 8)
        if ring.dtype != v.dtype:
            raise ValueError(f"codec.encode: ring_bits={ring_bits} does not match a {v.dtype} vector")
        return {"kind": "masked", "site": msg.site_id, "ring_bits": ring.bits, "length": int(v.size),
                "vector": ring.pack(v)}
    if isinstance(msg, UnmaskRequest):
        return {"kind": "unmask_request", "round": msg.round_id, "survivors": list(msg.survivors)}
    if isinstance(msg, UnmaskShares):
        so, ss = _shares_out(msg.seed_shares)
        ko, ks = _shares_out(msg.key_shares)
        return {"kind": "unmask", "site": msg.site_id, "seed_owners": so, "seed_shares": ss,
                "key_owners": ko, "key_shares": ks}
    raise TypeError(f"codec.encode: not a secure-aggregation message: {type(msg).__name__}")


def decode(record: dict) -> Any:
    """Inverse of :func:`encode`; a malformed record raises :class:`ProtocolError`."""
    try:
        kind = record["kind"]
        if kind == "advertise":
            return AdvertiseKeys(int(record["site"]), bytes(record["cipher_pk"]), bytes(record["mask_pk"]))
        if kind == "directory":
            ids = [int(i) for i in record["ids"]]
            keys = {i: (bytes(c), bytes(m)) for i, c, m in zip(ids, record["cipher_pks"], record["mask_pks"], strict=True)}
            return KeyDirectory(int(record["round"]), keys, bytes(record["graph_seed"]))
        if kind == "share_keys":
            return ShareKeys(int(record["site"]), {int(v): bytes(c) for v, c in zip(record["to"], record["ct"], strict=True)})
        if kind == "masked":
            ring = Ring(int(record["ring_bits"]))
            return MaskedInput(int(record["site"]), ring.unpack(bytes(record["vector"]), int(record["length"])))
        if kind == "unmask_request":
            return UnmaskRequest(int(record["round"]), tuple(int(s) for s in record["survivors"]))
        if kind == "unmask":
            seed = {int(o): shamir.share_from_bytes(bytes(s)) for o, s in zip(record["seed_owners"], record["seed_shares"], strict=True)}
            key = {int(o): shamir.share_from_bytes(bytes(s)) for o, s in zip(record["key_owners"], record["key_shares"], strict=True)}
            return UnmaskShares(int(record["site"]), seed, key)
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"codec.decode: malformed {record.get('kind', '?')!r} record: {e}") from None
    raise ProtocolError(f"codec.decode: unknown record kind {record.get('kind')!r}")


def encode_inbox(inbox: dict) -> dict:
    """A site's inbox ``{sender: ciphertext}`` as a record with the senders in ascending order."""
    senders = sorted(inbox)
    return {"kind": "inbox", "from": senders, "ct": [inbox[s] for s in senders]}


def decode_inbox(record: dict) -> dict:
    """The inbox of :func:`encode_inbox`; a ProtocolError for a malformed record."""
    try:
        return {int(s): bytes(c) for s, c in zip(record["from"], record["ct"], strict=True)}
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"codec.decode_inbox: malformed inbox record: {e}") from None


def site_state_to_bytes(state: SiteState) -> bytes:
    """The site's state (with its secrets) as bytes, to keep at the site between stages."""
    c = state.config
    d = state.directory
    obj = {
        "config": [c.threshold, c.vector_length, c.ring_bits, c.neighbours],
        "round": state.round_id, "site": state.site_id, "stage": int(state.stage),
        "secrets": [state.cipher_secret.hex(), state.mask_secret.hex(), state.self_seed.hex(), state.coeff_seed.hex()],
        "directory": None if d is None else encode_json_directory(d),
        "neighbours": sorted(state.neighbours),
        "own_shares": [hex(x) for x in state.own_shares],
        "held": {str(v): [hex(a), hex(b)] for v, (a, b) in state.held.items()},
    }
    return json.dumps(obj, separators=(",", ":")).encode()


def encode_json_directory(d: KeyDirectory) -> dict:
    return {"round": d.round_id, "seed": d.graph_seed.hex(),
            "keys": {str(i): [c.hex(), m.hex()] for i, (c, m) in d.keys.items()}}


def site_state_from_bytes(data: bytes) -> SiteState:
    """Inverse of :func:`site_state_to_bytes`."""
    try:
        o = json.loads(data.decode())
        t, n, k, nb = o["config"]
        d = o["directory"]
        directory = None if d is None else KeyDirectory(
            int(d["round"]), {int(i): (bytes.fromhex(c), bytes.fromhex(m)) for i, (c, m) in d["keys"].items()},
            bytes.fromhex(d["seed"]))
        sec = [bytes.fromhex(x) for x in o["secrets"]]
        return SiteState(
            config=SecAggConfig(threshold=t, vector_length=n, ring_bits=k, neighbours=nb), round_id=int(o["round"]),
            site_id=int(o["site"]), stage=Stage(o["stage"]), cipher_secret=sec[0], mask_secret=sec[1],
            self_seed=sec[2], coeff_seed=sec[3], directory=directory, neighbours=frozenset(o["neighbours"]),
            own_shares=tuple(int(x, 16) for x in o["own_shares"]),
            held={int(v): (int(a, 16), int(b, 16)) for v, (a, b) in o["held"].items()})
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"codec.site_state_from_bytes: malformed site state: {e}") from None
