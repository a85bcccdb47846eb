"""The server side of secure aggregation: four pure stage functions.

The server routes messages, checks that every stage has at least ``threshold`` sites, and at the end
reconstructs (from ≥ ``threshold`` Shamir shares each) the self-mask seeds of the sites that sent masked
input and the mask keys of those that dropped after sharing keys, so that it learns
``Σ_{u ∈ U3} x_u mod 2^k`` and the participation sets ``U1 ⊇ U2 ⊇ U3 ⊇ U4`` — nothing else about any
single site's input (against a semi-honest server colluding with fewer than ``threshold`` sites).

Fewer than ``threshold`` sites or shares at any point raise :class:`RoundFailedError`; the round has no
result then, and nothing partial is returned.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from dpfunc.secagg import _primitives as P
from dpfunc.secagg import shamir
from dpfunc.secagg.graph import build_graph
from dpfunc.secagg.types import (
    KEY_BYTES, AdvertiseKeys, KeyDirectory, MaskedInput, ProtocolError, RoundFailedError, SecAggConfig,
    ShareKeys, Stage, UnmaskRequest, UnmaskShares, _check_site_id,
)
from dpfunc.secagg.site import pair_mask_key, self_mask_key

__all__ = ["ServerState", "AggregateResult", "server_init", "server_advertise", "server_share_keys",
           "server_masked_input", "server_unmask"]


class ServerState(NamedTuple):
    config: SecAggConfig
    round_id: int
    graph_seed: bytes
    stage: Stage
    directory: KeyDirectory | None = None
    graph: Mapping[int, frozenset] = {}
    routed: Mapping[int, frozenset] = {}   # U2: sender -> recipients its shares were routed to
    survivors: tuple = ()                  # U3
    masked_sum: np.ndarray | None = None


class AggregateResult(NamedTuple):
    """``total``: ``Σ_{u ∈ included} x_u mod 2^k`` (ring elements); ``included``: ``U3``, sorted."""

    total: np.ndarray
    included: tuple


def _expect(fn: str, state: ServerState, stage: Stage) -> None:
    if not isinstance(state, ServerState):
        raise TypeError(f"{fn}: state must be a ServerState, got {type(state).__name__}")
    if state.stage != stage:
        raise ProtocolError(f"{fn}: server is at stage {state.stage.name}, not {stage.name}")


def _need(fn: str, stage: Stage, have: int, t: int, what: str) -> None:
    if have < t:
        raise RoundFailedError(f"{fn}: only {have} {what}, threshold is {t}: the round fails and must not be applied",
                               stage=stage, available=have, needed=t)


def _check_senders(fn: str, msgs: Mapping, allowed, what: str) -> None:
    if not isinstance(msgs, Mapping):
        raise TypeError(f"{fn}: messages must be a mapping site_id -> message, got {type(msgs).__name__}")
    for sid, m in msgs.items():
        if getattr(m, "site_id", None) != sid:
            raise ProtocolError(f"{fn}: message under key {sid} claims site {getattr(m, 'site_id', None)}")
        if sid not in allowed:
            raise ProtocolError(f"{fn}: site {sid} {what}")


def server_init(config: SecAggConfig, *, round_id: int, graph_seed: bytes) -> ServerState:
    """A fresh server for one round. ``graph_seed``: 32 public random bytes (chosen per round)."""
    fn = "server_init"
    if not isinstance(config, SecAggConfig):
        raise TypeError(f"{fn}: config must be a SecAggConfig, got {type(config).__name__}")
    round_id = _check_site_id(fn, "round_id", round_id)
    if not isinstance(graph_seed, (bytes, bytearray)) or len(graph_seed) != 32:
        raise ValueError(f"{fn}: graph_seed must be 32 bytes, got {graph_seed!r:.40}")
    return ServerState(config=config, round_id=round_id, graph_seed=bytes(graph_seed), stage=Stage.ADVERTISE_KEYS)


def server_advertise(state: ServerState, msgs: Mapping[int, AdvertiseKeys]) -> tuple[ServerState, KeyDirectory]:
    """Stage 0: the roster ``U1`` of advertised keys, broadcast to every site in it."""
    fn = "server_advertise"
    _expect(fn, state, Stage.ADVERTISE_KEYS)
    _check_senders(fn, msgs, range(0, 1 << 63), "is not a valid id")
    for sid, m in msgs.items():
        _check_site_id(fn, "site_id", sid)
        if len(m.cipher_public) != KEY_BYTES or len(m.mask_public) != KEY_BYTES:
            raise ProtocolError(f"{fn}: site {sid} advertised keys that are not {KEY_BYTES} bytes")
    _need(fn, Stage.ADVERTISE_KEYS, len(msgs), state.config.threshold, "sites advertised keys")
    keys = {sid: (bytes(m.cipher_public), bytes(m.mask_public)) for sid, m in sorted(msgs.items())}
    directory = KeyDirectory(state.round_id, keys, state.graph_seed)
    graph = build_graph(keys, degree=state.config.neighbours, graph_seed=state.graph_seed)
    return state._replace(stage=Stage.SHARE_KEYS, directory=directory, graph=graph), directory


def server_share_keys(state: ServerState, msgs: Mapping[int, ShareKeys]) -> tuple[ServerState, dict[int, dict[int, bytes]]]:
    """Stage 1: route each ciphertext to its recipient if the recipient also completed stage 1 (``U2``).

    Returns ``{recipient: {sender: ciphertext}}`` for every recipient in ``U2``.
    """
    fn = "server_share_keys"
    _expect(fn, state, Stage.SHARE_KEYS)
    _check_senders(fn, msgs, state.graph, "did not advertise keys")
    for sid, m in msgs.items():
        if set(m.ciphertexts) != set(state.graph[sid]):
            raise ProtocolError(f"{fn}: site {sid} sent shares to {sorted(m.ciphertexts)}, its neighbours are "
                                f"{sorted(state.graph[sid])}")
    _need(fn, Stage.SHARE_KEYS, len(msgs), state.config.threshold, "sites shared keys")
    u2 = set(msgs)
    inboxes = {v: {} for v in sorted(u2)}
    routed = {}
    for u in sorted(u2):
        dest = frozenset(v for v in msgs[u].ciphertexts if v in u2)
        routed[u] = dest
        for v in dest:
            inboxes[v][u] = bytes(msgs[u].ciphertexts[v])
    return state._replace(stage=Stage.MASKED_INPUT, routed=routed), inboxes


def server_masked_input(state: ServerState, msgs: Mapping[int, MaskedInput]) -> tuple[ServerState, UnmaskRequest]:
    """Stage 2: add up the masked vectors of ``U3`` and ask the survivors for shares."""
    fn = "server_masked_input"
    _expect(fn, state, Stage.MASKED_INPUT)
    _check_senders(fn, msgs, state.routed, "did not share keys")
    cfg, ring = state.config, state.config.ring
    _need(fn, Stage.MASKED_INPUT, len(msgs), cfg.threshold, "sites sent masked input")
    total = ring.zeros(cfg.vector_length)
    for sid, m in sorted(msgs.items()):
        y = np.asarray(m.vector)
        if y.dtype != ring.dtype or y.shape != (cfg.vector_length,):
            raise ProtocolError(f"{fn}: site {sid} sent a vector of {y.dtype} {y.shape}, expected "
                                f"{ring.dtype} ({cfg.vector_length},)")
        total += y
    ring.reduce(total)
    survivors = tuple(sorted(msgs))
    return (state._replace(stage=Stage.UNMASK, survivors=survivors, masked_sum=total),
            UnmaskRequest(state.round_id, survivors))


def _reconstruct(fn: str, owner: int, shares: dict, t: int, what: str) -> bytes:
    _need(fn, Stage.UNMASK, len(shares), t, f"shares of the {what} of site {owner}")
    try:
        secret = shamir.reconstruct(shares, threshold=t)
    except ValueError as e:
        raise ProtocolError(f"{fn}: {what} of site {owner}: {e}") from None
    if secret >= 1 << 256:
        raise ProtocolError(f"{fn}: the {what} of site {owner} reconstructs to more than 32 bytes")
    return secret.to_bytes(32, "big")


def server_unmask(state: ServerState, msgs: Mapping[int, UnmaskShares]) -> tuple[ServerState, AggregateResult]:
    """Stage 3: reconstruct the secrets and remove every mask that does not cancel; the sum of ``U3``."""
    fn = "server_unmask"
    _expect(fn, state, Stage.UNMASK)
    alive = set(state.survivors)
    _check_senders(fn, msgs, alive, "did not send masked input")
    cfg, ring, r = state.config, state.config.ring, state.round_id
    t = cfg.threshold
    _need(fn, Stage.UNMASK, len(msgs), t, "survivors sent their shares")
    dropped = set(state.routed) - alive
    seed_shares = {u: {} for u in alive}
    key_shares = {v: {} for v in dropped}
    for sid, m in msgs.items():
        bad = (set(m.seed_shares) - alive) | (set(m.key_shares) - dropped)
        if bad:
            raise ProtocolError(f"{fn}: site {sid} sent shares for {sorted(bad)} of the wrong kind")
        for u, y in m.seed_shares.items():
            if u != sid and sid not in state.routed[u]:
                raise ProtocolError(f"{fn}: site {sid} sent a share of site {u} it never received")
            seed_shares[u][sid + 1] = int(y)
        for v, y in m.key_shares.items():
            if sid not in state.routed[v]:
                raise ProtocolError(f"{fn}: site {sid} sent a share of site {v} it never received")
            key_shares[v][sid + 1] = int(y)
    total = state.masked_sum.copy()
    for u in sorted(alive):
        b = _reconstruct(fn, u, seed_shares[u], t, "self-mask seed")
        total -= P.prg_ring(self_mask_key(r, u, b), cfg.vector_length, ring.dtype)
    for v in sorted(dropped):
        partners = sorted(state.routed[v] & alive)  # survivors that masked with v
        if not partners:
            continue
        sk = _reconstruct(fn, v, key_shares[v], t, "mask key")
        if P.x25519_public(sk) != state.directory.keys[v][1]:
            raise ProtocolError(f"{fn}: the mask key of site {v} does not match its advertised public key")
        for u in partners:
            m = P.prg_ring(pair_mask_key(r, v, u, sk, state.directory.keys[u][1]), cfg.vector_length, ring.dtype)
            if u < v:   # u added +PRG(s_uv)
                total -= m
            else:
                total += m
    ring.reduce(total)
    return state._replace(stage=Stage.DONE, masked_sum=None), AggregateResult(total, tuple(sorted(alive)))
