"""Secure aggregation: the server learns only the sum of the sites' vectors, and sites may drop out.

The protocol of Bonawitz et al. (CCS 2017) — X25519 pairwise masks expanded by AES-CTR that cancel in
the sum, a self mask, both secrets Shamir-shared t-of-n so the survivors can remove the masks of sites
that dropped — with the optional sparse neighbourhood graph of SecAgg+ (Bell et al., CCS 2020). Written
as pure stage functions of explicit state (:mod:`.site`, :mod:`.server`), driven in-process by
:func:`run_round`, over a fixed-point ring (:mod:`.ring`) whose sum provably cannot wrap.

Trust model: the server is semi-honest (follows the protocol, tries to learn more) and may collude with
fewer than ``threshold`` sites; sites authenticate shares to each other with AES-GCM under X25519 keys
relayed by the server, without a PKI — a server that substitutes public keys (an active attack) is out
of scope, as is Bonawitz' consistency-check round (signatures). No engine imports; only ``numpy`` and
``cryptography``.

Submodules not imported here (they import torch): :mod:`dpfunc.secagg.federated` (the
``SecureAggregator`` of the federated rounds, ``--secure-aggregation``), :mod:`dpfunc.secagg.remote` (the
same across processes, e.g. Flower), :mod:`dpfunc.secagg.distributed_dp` (each site adds a share of the
DP noise; an option with stated trust assumptions).

Example:
    >>> import numpy as np
    >>> from dpfunc.secagg import SecAggConfig, run_round
    >>> cfg = SecAggConfig(threshold=2, vector_length=4, ring_bits=32)
    >>> xs = {u: np.arange(4, dtype=np.uint32) * (u + 1) for u in range(3)}
    >>> run_round(cfg, xs)[0].total.tolist()
    [0, 6, 12, 18]
"""

from dpfunc.secagg.ring import FixedPoint, Ring, check_sum_fits
from dpfunc.secagg.round import RoundStats, run_round
from dpfunc.secagg.server import (AggregateResult, ServerState, server_advertise, server_init,
                                  server_masked_input, server_share_keys, server_unmask)
from dpfunc.secagg.site import SiteState, site_advertise, site_masked_input, site_share_keys, site_unmask
from dpfunc.secagg.types import (AdvertiseKeys, KeyDirectory, MaskedInput, ProtocolError, RoundFailedError,
                                 SecAggConfig, SecAggError, ShareKeys, Stage, UnmaskRequest, UnmaskShares,
                                 wire_bytes)
from dpfunc.secagg import codec, shamir

__all__ = [
    "SecAggConfig", "Stage", "SecAggError", "RoundFailedError", "ProtocolError",
    "FixedPoint", "Ring", "check_sum_fits",
    "run_round", "RoundStats", "AggregateResult",
    "SiteState", "site_advertise", "site_share_keys", "site_masked_input", "site_unmask",
    "ServerState", "server_init", "server_advertise", "server_share_keys", "server_masked_input", "server_unmask",
    "AdvertiseKeys", "KeyDirectory", "ShareKeys", "MaskedInput", "UnmaskRequest", "UnmaskShares", "wire_bytes",
    "shamir", "codec",
]
