"""The site (client) side of secure aggregation: four pure stage functions.

Each function takes the site's :class:`SiteState` and the server's message of the previous stage and
returns the new state and the site's reply; nothing is mutated, and all randomness is derived from the
32-byte ``secret`` given to :func:`site_advertise` (use ``os.urandom(32)``, fresh for each round).

Order is enforced: a site refuses (``ProtocolError``) to run a stage out of turn, so it never sends its
masked input before both key stages completed with at least ``threshold`` sites, and it never reveals the
self-mask share and the mask-key share of the same site.

Protocol (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, semi-honest server variant without the consistency-check round; SecAgg+ neighbourhoods from
Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import numpy as np

from dpfunc.secagg import _primitives as P
from dpfunc.secagg import shamir
from dpfunc.secagg.graph import build_graph
from dpfunc.secagg.types import (
    AdvertiseKeys, KeyDirectory, MaskedInput, ProtocolError, RoundFailedError, SecAggConfig, ShareKeys,
    Stage, UnmaskRequest, UnmaskShares, _check_site_id,
)

__all__ = ["SiteState", "site_advertise", "site_share_keys", "site_masked_input", "site_unmask",
           "check_threshold_majority", "pair_mask_key", "self_mask_key", "share_aad", "share_key"]


class SiteState(NamedTuple):
    """Everything one site holds during a round (secret: never sent as is)."""

    config: SecAggConfig
    round_id: int
    site_id: int
    stage: Stage                         # the next stage this site will run
    cipher_secret: bytes                 # X25519 private key for share encryption
    mask_secret: bytes                   # X25519 private key for pairwise masks (Shamir-shared)
    self_seed: bytes                     # b_u, seed of the self mask (Shamir-shared)
    coeff_seed: bytes                    # Shamir coefficients
    directory: Optional[KeyDirectory] = None
    neighbours: frozenset = frozenset()
    own_shares: tuple = ()               # (self-seed share, mask-key share) at this site's own point
    held: Mapping[int, tuple[int, int]] = {}   # partner -> (its self-seed share, its mask-key share)


def _r8(i: int) -> bytes:
    return int(i).to_bytes(8, "big")


def share_key(round_id: int, sender: int, receiver: int, secret: bytes, peer_public: bytes) -> bytes:
    """AEAD key of the shares ``sender`` encrypts for ``receiver`` in a round (X25519 agreement, then HKDF)."""
    return P.hkdf(P.x25519_agree(secret, peer_public),
                  b"dpfunc-secagg/share-enc" + _r8(round_id) + _r8(sender) + _r8(receiver))


def share_aad(round_id: int, sender: int, receiver: int) -> bytes:
    """Associated data binding an encrypted share to its round, sender and receiver."""
    return b"dpfunc-secagg/share" + _r8(round_id) + _r8(sender) + _r8(receiver)


def pair_mask_key(round_id: int, u: int, v: int, secret: bytes, peer_public: bytes) -> bytes:
    """PRG key of the pairwise mask of ``u`` and ``v`` (symmetric in u, v)."""
    lo, hi = min(u, v), max(u, v)
    return P.hkdf(P.x25519_agree(secret, peer_public), b"dpfunc-secagg/pair-mask" + _r8(round_id) + _r8(lo) + _r8(hi))


def self_mask_key(round_id: int, u: int, self_seed: bytes) -> bytes:
    """PRG key of site ``u``'s self mask in a round (HKDF of its secret self seed)."""
    return P.hkdf(self_seed, b"dpfunc-secagg/self-mask" + _r8(round_id) + _r8(u))


def check_threshold_majority(fn: str, threshold: int, group: int) -> None:
    """``group // 2 < threshold ≤ group`` (group = neighbourhood size, the site included).

    Raises:
        RoundFailedError: ``threshold > group`` (too few sites are left for this threshold).
        ValueError: ``threshold ≤ group // 2``: a minority could not be told apart from a lying server.
    """
    if threshold > group:
        raise RoundFailedError(
            f"{fn}: threshold={threshold} exceeds the neighbourhood of {group} sites that advertised keys",
            stage=Stage.ADVERTISE_KEYS, available=group, needed=threshold)
    if threshold <= group // 2:
        raise ValueError(
            f"{fn}: threshold={threshold} must be a strict majority of the neighbourhood of {group} sites "
            f"(> {group // 2}); raise the threshold or use SecAgg+ neighbours")


def _expect(fn: str, state: SiteState, stage: Stage) -> None:
    if not isinstance(state, SiteState):
        raise TypeError(f"{fn}: state must be a SiteState, got {type(state).__name__}")
    if state.stage != stage:
        raise ProtocolError(f"{fn}: site {state.site_id} is at stage {state.stage.name}, not {stage.name}; "
                            "stages must run in order, once each")


def site_advertise(config: SecAggConfig, *, site_id: int, round_id: int, secret: bytes) -> tuple[SiteState, AdvertiseKeys]:
    """Stage 0: derive this round's keys from ``secret`` and advertise the two public keys."""
    fn = "site_advertise"
    if not isinstance(config, SecAggConfig):
        raise TypeError(f"{fn}: config must be a SecAggConfig, got {type(config).__name__}")
    site_id = _check_site_id(fn, "site_id", site_id)
    round_id = _check_site_id(fn, "round_id", round_id)
    if not isinstance(secret, (bytes, bytearray)) or len(secret) != 32:
        raise ValueError(f"{fn}: secret must be 32 random bytes (os.urandom(32)), got "
                         f"{type(secret).__name__} of length {len(secret) if hasattr(secret, '__len__') else '?'}")
    tag = _r8(round_id) + _r8(site_id)
    keys = {name: P.hkdf(bytes(secret), b"dpfunc-secagg/" + name + tag)
            for name in (b"cipher", b"mask", b"self", b"coeff")}
    state = SiteState(config=config, round_id=round_id, site_id=site_id, stage=Stage.SHARE_KEYS,
                      cipher_secret=keys[b"cipher"], mask_secret=keys[b"mask"], self_seed=keys[b"self"],
                      coeff_seed=keys[b"coeff"])
    msg = AdvertiseKeys(site_id, P.x25519_public(state.cipher_secret), P.x25519_public(state.mask_secret))
    return state, msg


def site_share_keys(state: SiteState, directory: KeyDirectory) -> tuple[SiteState, ShareKeys]:
    """Stage 1: Shamir-share the self-mask seed and the mask key among the neighbourhood (this site
    keeps its own share) and encrypt each neighbour's pair of shares for it."""
    fn = "site_share_keys"
    _expect(fn, state, Stage.SHARE_KEYS)
    if not isinstance(directory, KeyDirectory):
        raise TypeError(f"{fn}: directory must be a KeyDirectory, got {type(directory).__name__}")
    u, cfg = state.site_id, state.config
    if directory.round_id != state.round_id:
        raise ProtocolError(f"{fn}: directory is for round {directory.round_id}, this site is in round {state.round_id}")
    mine = directory.keys.get(u)
    if mine is None or tuple(mine) != (P.x25519_public(state.cipher_secret), P.x25519_public(state.mask_secret)):
        raise ProtocolError(f"{fn}: the directory does not carry site {u}'s advertised keys")
    if len(directory.keys) < cfg.threshold:
        raise RoundFailedError(f"{fn}: only {len(directory.keys)} sites advertised keys, threshold is {cfg.threshold}",
                               stage=Stage.ADVERTISE_KEYS, available=len(directory.keys), needed=cfg.threshold)
    publics = [pk for pair in directory.keys.values() for pk in pair]
    if len(set(publics)) != len(publics):
        raise ProtocolError(f"{fn}: the directory repeats a public key")
    graph = build_graph(directory.keys, degree=cfg.neighbours, graph_seed=directory.graph_seed)
    nbrs = graph[u]
    check_threshold_majority(fn, cfg.threshold, len(nbrs) + 1)
    points = [v + 1 for v in sorted(nbrs | {u})]
    seed_shares = shamir.split(int.from_bytes(state.self_seed, "big"), threshold=cfg.threshold,
                               points=points, seed=P.hkdf(state.coeff_seed, b"self"))
    key_shares = shamir.split(int.from_bytes(state.mask_secret, "big"), threshold=cfg.threshold,
                              points=points, seed=P.hkdf(state.coeff_seed, b"mask"))
    cts = {}
    for v in sorted(nbrs):
        plain = _r8(u) + _r8(v) + shamir.share_to_bytes(seed_shares[v + 1]) + shamir.share_to_bytes(key_shares[v + 1])
        key = share_key(state.round_id, u, v, state.cipher_secret, directory.keys[v][0])
        cts[v] = P.aead_encrypt(key, plain, share_aad(state.round_id, u, v))
    new = state._replace(stage=Stage.MASKED_INPUT, directory=directory, neighbours=nbrs,
                         own_shares=(seed_shares[u + 1], key_shares[u + 1]))
    return new, ShareKeys(u, cts)


def site_masked_input(state: SiteState, inbox: Mapping[int, bytes], vector: np.ndarray) -> tuple[SiteState, MaskedInput]:
    """Stage 2: decrypt and keep the neighbours' shares, then send ``x + PRG(b) + Σ ±PRG(s_uv)``.

    Args:
        inbox: ``{sender: ciphertext}`` routed by the server; the senders are this site's neighbours that
            completed stage 1 (``U2``); each ciphertext must authenticate.
        vector: this site's input, ring elements (``config.ring.dtype``, shape ``(vector_length,)``).

    Raises:
        RoundFailedError: fewer than ``threshold`` sites of the neighbourhood (this one included) completed
            the key stages: the site does not reveal its masked input.
    """
    fn = "site_masked_input"
    _expect(fn, state, Stage.MASKED_INPUT)
    u, cfg, ring = state.site_id, state.config, state.config.ring
    vector = np.asarray(vector)
    if vector.dtype != ring.dtype or vector.shape != (cfg.vector_length,):
        raise ValueError(f"{fn}: vector must be ring elements of dtype {ring.dtype} and shape "
                         f"({cfg.vector_length},), got {vector.dtype} {vector.shape}")
    if ring.bits < ring.dtype.itemsize * 8 and np.any(vector >> np.array(ring.bits, dtype=ring.dtype)):
        raise ValueError(f"{fn}: vector has entries >= 2**{ring.bits} (use Ring.from_signed)")
    if not isinstance(inbox, Mapping):
        raise TypeError(f"{fn}: inbox must be a mapping sender -> ciphertext, got {type(inbox).__name__}")
    stray = set(inbox) - state.neighbours
    if stray:
        raise ProtocolError(f"{fn}: inbox has ciphertexts from non-neighbours {sorted(stray)}")
    held = {}
    for v, ct in inbox.items():
        key = share_key(state.round_id, v, u, state.cipher_secret, state.directory.keys[v][0])
        try:
            plain = P.aead_decrypt(key, bytes(ct), share_aad(state.round_id, v, u))
        except P.InvalidTag:
            raise ProtocolError(f"{fn}: the ciphertext from site {v} does not authenticate") from None
        if plain[:16] != _r8(v) + _r8(u) or len(plain) != 16 + 2 * shamir.SHARE_BYTES:
            raise ProtocolError(f"{fn}: the ciphertext from site {v} is not addressed {v} -> {u}")
        s = shamir.SHARE_BYTES
        held[v] = (shamir.share_from_bytes(plain[16:16 + s]), shamir.share_from_bytes(plain[16 + s:]))
    if len(held) + 1 < cfg.threshold:
        raise RoundFailedError(
            f"{fn}: site {u}: only {len(held) + 1} sites of its neighbourhood completed the key stages, "
            f"threshold is {cfg.threshold}; masked input withheld",
            stage=Stage.SHARE_KEYS, available=len(held) + 1, needed=cfg.threshold)
    y = vector.copy()
    y += P.prg_ring(self_mask_key(state.round_id, u, state.self_seed), cfg.vector_length, ring.dtype)
    for v in sorted(held):
        m = P.prg_ring(pair_mask_key(state.round_id, u, v, state.mask_secret, state.directory.keys[v][1]),
                       cfg.vector_length, ring.dtype)
        if u < v:
            y += m
        else:
            y -= m
    ring.reduce(y)
    return state._replace(stage=Stage.UNMASK, held=held), MaskedInput(u, y)


def site_unmask(state: SiteState, request: UnmaskRequest) -> tuple[SiteState, UnmaskShares]:
    """Stage 3: for each partner (and itself) that survived, the share of its self-mask seed; for each
    partner that dropped after stage 1, the share of its mask key. Never both for one site."""
    fn = "site_unmask"
    _expect(fn, state, Stage.UNMASK)
    if not isinstance(request, UnmaskRequest):
        raise TypeError(f"{fn}: request must be an UnmaskRequest, got {type(request).__name__}")
    u, cfg = state.site_id, state.config
    if request.round_id != state.round_id:
        raise ProtocolError(f"{fn}: request is for round {request.round_id}, this site is in round {state.round_id}")
    survivors = tuple(request.survivors)
    if len(set(survivors)) != len(survivors):
        raise ProtocolError(f"{fn}: the survivor list repeats a site")
    alive = set(survivors)
    if u not in alive:
        raise ProtocolError(f"{fn}: site {u} sent its masked input but is not in the survivor list")
    if len(alive) < cfg.threshold:
        raise RoundFailedError(f"{fn}: only {len(alive)} sites sent masked input, threshold is {cfg.threshold}",
                               stage=Stage.MASKED_INPUT, available=len(alive), needed=cfg.threshold)
    liars = (alive & state.neighbours) - set(state.held)
    if liars:
        raise ProtocolError(f"{fn}: survivors {sorted(liars)} never shared keys with site {u}")
    seed_shares = {v: s for v, (s, _) in state.held.items() if v in alive}
    seed_shares[u] = state.own_shares[0]
    key_shares = {v: k for v, (_, k) in state.held.items() if v not in alive}
    return state._replace(stage=Stage.DONE), UnmaskShares(u, seed_shares, key_shares)
