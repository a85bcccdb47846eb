"""dpfunc.mpc: two-party secret-shared inference with a dealer (Z_2^64, fixed point, Beaver triples).

Parties: 0 = model owner (holds the weights), 1 = data owner (holds the image), 2 = dealer (makes
correlated randomness from its own key; never sees inputs or outputs and receives nothing).

* :mod:`~dpfunc.mpc.ring` — encode/decode, sharing, local division (pure functions)
* :mod:`~dpfunc.mpc.context` — a party's context, channels, dealer material
* :mod:`~dpfunc.mpc.prg` — AES-256-CTR keystreams (uniform words into tensors) and 256-bit party keys
* :mod:`~dpfunc.mpc.protocols` — Beaver products, truncation, comparison, ReLU, pooling, argmax
* :mod:`~dpfunc.mpc.nonlinear` — tanh, sigmoid, rsqrt, GroupNorm
* :mod:`~dpfunc.mpc.simulation` — both parties in one process (threads), for tests and benchmarks
* :mod:`~dpfunc.mpc.parties` — three OS processes over ``torch.distributed`` (gloo)

Models are compiled into MPC ops by :func:`dpfunc.bridge.mpc.compile_module`.
"""

from dpfunc.mpc.context import (
    DATA_OWNER,
    DEALER,
    MODEL_OWNER,
    Bilinear,
    CommStats,
    Context,
    DealerSource,
    Kind,
    MaterialQueue,
    MaterialStream,
    Request,
    queue_channel_pair,
)
from dpfunc.mpc.nonlinear import RsqrtConfig, TanhApprox, group_norm, rsqrt, sigmoid, tanh
from dpfunc.mpc.prg import Keystream, StreamKey
from dpfunc.mpc.protocols import (
    add_public,
    argmax_onehot,
    avg_pool2d,
    MaskedOperand,
    beaver,
    beaver_fixed,
    and_shared,
    cross_and,
    conv2d,
    ltz,
    mask_operands,
    matmul,
    max_last,
    max_pool2d,
    maximum,
    msb_xor,
    mul,
    mul_batch,
    mul_bit,
    mul_chain_operand,
    mul_fixed,
    mul_int,
    mul_public,
    open_shares,
    relu,
    reveal_to,
    share_from,
    square,
    truncate,
)
from dpfunc.mpc.ring import (
    FixedPoint,
    decode,
    div_public_local,
    encode,
    reconstruct,
    reconstruct_xor,
    share,
    share_xor,
    uniform_ring,
)
from dpfunc.mpc.simulation import SimulationResult, run_dealer, simulate

__all__ = [
    "MODEL_OWNER", "DATA_OWNER", "DEALER",
    "FixedPoint", "encode", "decode", "share", "reconstruct", "share_xor", "reconstruct_xor",
    "uniform_ring", "div_public_local",
    "Context", "CommStats", "Kind", "Bilinear", "Request", "DealerSource", "MaterialStream", "MaterialQueue",
    "queue_channel_pair", "Keystream", "StreamKey",
    "share_from", "reveal_to", "open_shares", "add_public", "mul_public", "truncate", "beaver",
    "MaskedOperand", "mask_operands", "beaver_fixed", "and_shared", "cross_and", "mul_chain_operand", "mul_fixed",
    "mul", "mul_batch", "mul_bit", "mul_int", "square", "matmul", "conv2d", "msb_xor", "ltz", "relu", "maximum",
    "max_last", "max_pool2d", "avg_pool2d", "argmax_onehot",
    "TanhApprox", "tanh", "sigmoid", "RsqrtConfig", "rsqrt", "group_norm",
    "SimulationResult", "run_dealer", "simulate",
]
