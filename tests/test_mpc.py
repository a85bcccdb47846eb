"""dpfunc.mpc protocols against plaintext oracles, and the privacy of each party's view.

Shares are reconstructed here only to check results; every protocol runs through :func:`simulate`
(the dealer's run, then both parties in threads), i.e. the same code as the real parties.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare

from dpfunc.keys import Key
from dpfunc.mpc import (
    DEALER,
    Bilinear,
    Context,
    FixedPoint,
    Kind,
    Request,
    RsqrtConfig,
    TanhApprox,
    argmax_onehot,
    avg_pool2d,
    beaver,
    conv2d,
    decode,
    div_public_local,
    encode,
    group_norm,
    ltz,
    matmul,
    max_pool2d,
    mul,
    reconstruct,
    relu,
    reveal_to,
    rsqrt,
    run_dealer,
    share,
    share_from,
    sigmoid,
    simulate,
    square,
    tanh,
)
from dpfunc.mpc.context import deal

FP = FixedPoint()
ULP = 2.0**-16
seeds = st.integers(0, 2**32 - 1)


def _run(fn, *, x=None, y=None, seed=0, record=False):
    """Run ``fn(ctx, [x], [y])`` with x from the data owner and y from the model owner; reveal to 1."""

    def program(ctx):
        args = []
        if x is not None:
            args.append(share_from(ctx, 1, x if ctx.rank == 1 else None, tuple(x.shape), Key(seed).fold_in(1)))
        if y is not None:
            args.append(share_from(ctx, 0, y if ctx.rank == 0 else None, tuple(y.shape), Key(seed).fold_in(2)))
        out = fn(ctx, *args)
        return out if record else reveal_to(ctx, 1, out)

    res = simulate(program, dealer_key=Key(seed).fold_in(3), record=record)
    return res if record else res.outputs[1]


def _floats(seed, shape, scale=4.0):
    return torch.randn(shape, generator=Key(seed).generator(), dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------ ring
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20))
def test_encode_decode_round_trip_within_half_ulp(values):
    v = torch.tensor(values, dtype=torch.float64)
    assert (decode(encode(v)) - v).abs().max() <= ULP / 2 + 1e-9 * v.abs().max()


def test_encode_refuses_non_finite_and_out_of_range():
    with pytest.raises(ValueError, match="encode: values must be finite"):
        encode(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="encode: values must satisfy"):
        encode(torch.tensor([2.0**47]))
    with pytest.raises(ValueError, match="FixedPoint: fractional_bits"):
        FixedPoint(0)


@given(seeds)
def test_share_reconstructs_exactly(seed):
    x = torch.randint(-(2**63), 2**63 - 1, (50,), generator=Key(seed).generator())
    s0, s1 = share(x, Key(seed).fold_in(1))
    assert torch.equal(reconstruct(s0, s1), x)


def _byte_counts(t: torch.Tensor) -> torch.Tensor:
    return torch.bincount(t.contiguous().view(torch.uint8).reshape(-1).long(), minlength=256)


def test_one_share_alone_is_uniform_for_any_secret():
    # chi-square goodness of fit of the bytes of one share, for a zero and an extreme secret
    for secret in (torch.zeros(20000, dtype=torch.int64), torch.full((20000,), 2**62, dtype=torch.int64)):
        for s in share(secret, Key(5)):
            assert chisquare(_byte_counts(s).numpy()).pvalue > 1e-3
    # the test has power: the secret itself is far from uniform
    assert chisquare(_byte_counts(encode(_floats(0, (20000,)))).numpy()).pvalue < 1e-3


# ------------------------------------------------------------------------------ local truncation
@given(seeds, st.integers(1, 10**6))
def test_local_division_error_below_one(seed, divisor):
    x = torch.randint(-(2**40), 2**40, (200,), generator=Key(seed).generator())
    s0, s1 = share(x, Key(seed).fold_in(1))
    got = div_public_local(s0, divisor, 0) + div_public_local(s1, divisor, 1)
    exact = x.double() / divisor
    assert (got.double() - exact).abs().max() < 1.0 + 1e-6


def test_local_truncation_failure_rate_matches_formula():
    # |x| = 2^60 → predicted failure probability |x| / 2^64 = 1/16
    n = 40000
    x = torch.full((n,), 2**60, dtype=torch.int64)
    s0, s1 = share(x, Key(1))
    got = div_public_local(s0, 2**16, 0) + div_public_local(s1, 2**16, 1)
    failures = ((got - 2**44).abs() > 1).double().mean().item()
    sd = math.sqrt(n * (1 / 16) * (15 / 16)) / n
    assert abs(failures - 1 / 16) < 5 * sd


def test_local_division_validates_arguments():
    with pytest.raises(ValueError, match="div_public_local: divisor must be an int >= 1, got 0"):
        div_public_local(torch.zeros(1, dtype=torch.int64), 0, 0)
    with pytest.raises(ValueError, match="div_public_local: rank must be 0 or 1, got 2"):
        div_public_local(torch.zeros(1, dtype=torch.int64), 2, 2)


# ----------------------------------------------------------------------------- dealer and Beaver
@given(seeds)
def test_dealer_material_is_correct_and_each_share_uniform(seed):
    for req in (
        Request(Kind.TRIPLE, (3, 4), (4, 5), Bilinear.MATMUL),
        Request(Kind.TRIPLE, (1, 2, 5, 5), (3, 2, 3, 3), Bilinear.CONV2D, ((1, 1), (1, 1), (1, 1), 1)),
        Request(Kind.SQUARE, (7,)),
        Request(Kind.AND, (7,)),
        Request(Kind.AND, (7,), params=(8,)),
        Request(Kind.AND, (7,), params=(16,)),
        Request(Kind.BIT, (7,)),
    ):
        s0, s1 = deal(req, Key(seed))
        if req.kind is Kind.TRIPLE:
            a, b, c = (u + v for u, v in zip(s0, s1))
            ref = a @ b if req.op is Bilinear.MATMUL else F.conv2d(a, b, None, 1, 1)
            assert torch.equal(c, ref)
        elif req.kind is Kind.SQUARE:
            a, c = (u + v for u, v in zip(s0, s1))
            assert torch.equal(c, a * a)
        elif req.kind is Kind.AND:
            a, b, c = (u ^ v for u, v in zip(s0, s1))
            assert torch.equal(c, a & b)
        else:
            r = (s0[0] ^ s1[0]).long()
            assert set(r.tolist()) <= {0, 1} and torch.equal(s0[1] + s1[1], r)


def test_dealer_receives_nothing_and_depends_only_on_its_key():
    x1, x2 = encode(_floats(1, (4, 6))), encode(_floats(2, (4, 6)))

    def program_for(x):
        def program(ctx):
            xs = share_from(ctx, 1, x if ctx.rank == 1 else None, (4, 6), Key(9))
            return relu(ctx, mul(ctx, xs, xs))

        return program

    a = run_dealer(program_for(x1), Key(3))
    b = run_dealer(program_for(x2), Key(3))
    c = run_dealer(program_for(x1), Key(4))
    assert torch.equal(a.flat(0), b.flat(0)) and torch.equal(a.flat(1), b.flat(1))
    assert not torch.equal(a.flat(1), c.flat(1))
    ctx = Context(DEALER, None, a)
    assert ctx.channel is None and torch.equal(ctx.exchange(torch.ones(3, dtype=torch.int64)), torch.zeros(3, dtype=torch.int64))


@given(seeds, st.integers(1, 4), st.integers(1, 5), st.integers(1, 5))
@settings(max_examples=10)
def test_beaver_products_are_exact_in_the_ring(seed, b, n, m):
    g = Key(seed).generator()
    x = torch.randint(-(2**63), 2**63 - 1, (b, n), generator=g)
    y = torch.randint(-(2**63), 2**63 - 1, (n, m), generator=g)
    w = torch.randint(-(2**63), 2**63 - 1, (1, n), generator=g)
    out = _run(lambda ctx, xs, ys: torch.cat([beaver(ctx, xs, ys, Bilinear.MATMUL).reshape(-1)]), x=x, y=y, seed=seed)
    assert torch.equal(out, (x @ y).reshape(-1))
    out = _run(lambda ctx, xs, ws: beaver(ctx, xs, ws, Bilinear.MUL), x=x, y=w, seed=seed)
    assert torch.equal(out, x * w)


@given(seeds, st.integers(1, 3), st.integers(5, 9), st.integers(0, 1), st.integers(1, 2))
@settings(max_examples=8)
def test_fixed_point_conv_matmul_mul_match_float(seed, cin, size, padding, stride):
    xf, wf = _floats(seed, (2, cin, size, size), 2.0), _floats(seed + 1, (3, cin, 3, 3), 0.5)
    out = decode(_run(lambda c, xs, ws: conv2d(c, xs, ws, stride, padding), x=encode(xf), y=encode(wf), seed=seed))
    ref = F.conv2d(decode(encode(xf)), decode(encode(wf)), None, stride, padding)
    assert (out - ref).abs().max() <= 1.5 * ULP  # truncation only; inputs compared after encoding
    a, b = _floats(seed, (4, 6)), _floats(seed + 2, (6, 3))
    out = decode(_run(lambda c, xs, ys: matmul(c, xs, ys), x=encode(a), y=encode(b), seed=seed))
    assert (out - decode(encode(a)) @ decode(encode(b))).abs().max() <= 1.5 * ULP
    out = decode(_run(lambda c, xs, ys: mul(c, xs, ys), x=encode(a), y=encode(a * 0.3), seed=seed))
    assert (out - decode(encode(a)) * decode(encode(a * 0.3))).abs().max() <= 1.5 * ULP
    out = decode(_run(lambda c, xs: square(c, xs), x=encode(a), seed=seed))
    assert (out - decode(encode(a)) ** 2).abs().max() <= 1.5 * ULP


# ----------------------------------------------------------------------------------- comparisons
@given(seeds)
@settings(max_examples=10)
def test_ltz_and_relu_are_exact_on_the_whole_ring(seed):
    g = Key(seed).generator()
    x = torch.cat([
        torch.randint(-(2**63), 2**63 - 1, (300,), generator=g),
        torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62)]),
    ])
    assert torch.equal(_run(lambda c, xs: ltz(c, xs), x=x, seed=seed), (x < 0).long())
    assert torch.equal(_run(lambda c, xs: relu(c, xs), x=x, seed=seed), x.clamp(min=0))


@given(seeds, st.integers(1, 6))
@settings(max_examples=10)
def test_argmax_onehot_matches_torch_first_max(seed, classes):
    x = encode(_floats(seed, (5, classes)).round(decimals=1))  # rounding makes ties likely
    out = _run(lambda c, xs: argmax_onehot(c, xs), x=x, seed=seed)
    assert torch.equal(out, F.one_hot(x.argmax(-1), classes))


@given(seeds, st.sampled_from([(2, 2, 0), (3, 2, 1), (3, 1, 1)]))
@settings(max_examples=6)
def test_pooling_matches_torch(seed, cfg):
    k, s, p = cfg
    xf = _floats(seed, (1, 2, 7, 7))
    x = encode(xf)
    out = _run(lambda c, xs: max_pool2d(c, xs, k, s, p), x=x, seed=seed)
    assert torch.equal(out, F.max_pool2d(x.double(), k, s, p).long())
    out = decode(_run(lambda c, xs: avg_pool2d(c, xs, 2), x=x, seed=seed))
    assert (out - F.avg_pool2d(decode(x), 2)).abs().max() <= ULP


# ------------------------------------------------------------------------------ non-linearities
def test_tanh_approximation_error_is_as_stated():
    approx = TanhApprox()
    assert approx.max_error() < 1e-4
    xf = torch.cat([torch.linspace(-8, 8, 1201, dtype=torch.float64), torch.tensor([-100.0, 100.0, 0.0])])
    out = decode(_run(lambda c, xs: tanh(c, xs), x=encode(xf), seed=1))
    # fixed-point error of the protocol: Horner's 8 truncations (< 1 ulp each, damped by |v| ≤ 1) and
    # the encoded coefficients, ≤ (degree + 1) ulps ≈ 1.5e-4 in the worst case; 5.2e-5 observed here
    assert (out - approx.plaintext(xf)).abs().max() < 8e-5
    assert (out - torch.tanh(xf)).abs().max() < 1.5e-4
    out = decode(_run(lambda c, xs: sigmoid(c, xs), x=encode(xf), seed=2))
    assert (out - torch.sigmoid(xf)).abs().max() < 1e-4


def test_tanh_approx_validates():
    with pytest.raises(ValueError, match="TanhApprox: pieces must be"):
        TanhApprox(pieces=0)


@given(seeds)
@settings(max_examples=3)
def test_rsqrt_relative_error(seed):
    v = torch.exp2(torch.empty(40, dtype=torch.float64).uniform_(-6, 16.9, generator=Key(seed).generator()))
    out = decode(_run(lambda c, xs: rsqrt(c, xs), x=encode(v), seed=seed))
    truth = v.rsqrt()
    # fixed point: v is known to 2^-17 (relative 1e-3 at 2^-6), y to a few ulps (2^-16)
    assert ((out - truth).abs() <= 1e-3 * truth + 4 * ULP).all()


@given(seeds, st.sampled_from([1, 2, 4]))
@settings(max_examples=5)
def test_group_norm_matches_torch(seed, groups):
    x = _floats(seed, (2, 4, 5, 5), 3.0) + 1.0
    w, b = _floats(seed + 1, (4,), 1.0), _floats(seed + 2, (4,), 1.0)
    params = torch.cat([encode(w), encode(b)])
    out = decode(_run(lambda c, xs, ps: group_norm(c, xs, groups, ps[:4], ps[4:], 1e-5), x=encode(x), y=params, seed=seed))
    assert (out - F.group_norm(x, groups, w, b, 1e-5)).abs().max() < 2e-3


def test_rsqrt_config_validates():
    with pytest.raises(ValueError, match="RsqrtConfig: iterations"):
        RsqrtConfig(iterations=-1)


# ------------------------------------------------------------------------- view independence
def _transcript_counts(transcripts):
    """Byte histogram of all multi-byte words received, and value histogram of all uint8 messages
    (the narrow AND openings of 1–8 bits and the opened B2A bits)."""
    words = torch.zeros(256, dtype=torch.int64)
    small = torch.zeros(256, dtype=torch.int64)
    for t in transcripts:
        if t.dtype == torch.uint8:
            small += torch.bincount(t.reshape(-1).long(), minlength=256)
        else:
            words += _byte_counts(t)
    return words, small


def _views(secret_x, secret_w, runs, party):
    words, small = torch.zeros(256, dtype=torch.int64), torch.zeros(256, dtype=torch.int64)
    for r in range(runs):
        res = _run(lambda c, xs, ws: tanh(c, relu(c, matmul(c, xs, ws))), x=secret_x, y=secret_w, seed=1000 + r, record=True)
        w, b = _transcript_counts(res.transcripts[party])
        words += w
        small += b
    return words, small


def _same_distribution(c1, c2) -> float:
    table = torch.stack([c1, c2])
    return chi2_contingency(table[:, table.sum(0) > 0].numpy()).pvalue


def test_each_party_view_is_independent_of_the_other_party_secret():
    """Two different secrets of the *other* party give indistinguishable views (chi-square
    contingency tests at α = 1e-3 each; 4 tests, family-wise false alarm ≤ 4e-3; derandomized)."""
    x = encode(_floats(0, (2, 6)))
    w1, w2 = encode(_floats(1, (6, 3))), encode(torch.full((6, 3), 7.5, dtype=torch.float64))
    # the data owner's view (party 1) under two weight matrices
    v1, v2 = _views(x, w1, 6, 1), _views(x, w2, 6, 1)
    assert _same_distribution(v1[0], v2[0]) > 1e-3
    assert _same_distribution(v1[1], v2[1]) > 1e-3
    # the model owner's view (party 0) under two images
    x2 = encode(torch.full((2, 6), -3.0, dtype=torch.float64))
    u1, u2 = _views(x, w1, 6, 0), _views(x2, w1, 6, 0)
    assert _same_distribution(u1[0], u2[0]) > 1e-3
    assert _same_distribution(u1[1], u2[1]) > 1e-3
    # the words are uniform bytes, and the same test detects a leak: the encodings themselves
    assert chisquare(v1[0].numpy()).pvalue > 1e-3
    assert _same_distribution(_byte_counts(w1.repeat(200, 1)), _byte_counts(w2.repeat(200, 1))) < 1e-3
