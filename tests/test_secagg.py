"""Secure aggregation (dpfunc.secagg): Shamir oracles, the fixed-point ring, the four stages with
dropouts at each, what the server sees, stage order and bad input.

Invariant 10 of ARCHITECTURE.md: the unmasked sum equals the plain sum (exactly in the ring, so up to
the fixed-point rounding bound in reals) for any dropout pattern leaving ≥ t sites; fewer than t shares
reveal nothing; a failed round raises and has no result.
"""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from scipy import stats

from dpfunc.secagg import (
    FixedPoint, ProtocolError, Ring, RoundFailedError, SecAggConfig, Stage, UnmaskRequest,
    check_sum_fits, run_round, server_advertise, server_init, server_masked_input, server_share_keys,
    site_advertise, site_masked_input, site_share_keys, site_unmask, shamir,
)
from dpfunc.secagg.graph import build_graph


def _bytes(seed: int, label: str = "") -> bytes:
    """32 deterministic bytes for replayable tests (the library itself takes os.urandom(32))."""
    return hashlib.sha256(f"{seed}/{label}".encode()).digest()


def _secrets(seed: int, n: int) -> dict:
    return {u: _bytes(seed, f"site{u}") for u in range(n)}


# ---------------------------------------------------------------- Shamir

@given(secret=st.integers(0, 2**256 - 1), n=st.integers(1, 9), data=st.data())
def test_shamir_any_t_shares_reconstruct(secret, n, data):
    t = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**32 - 1))
    points = data.draw(st.lists(st.integers(1, 2**64), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, threshold=t, points=points, seed=_bytes(seed))
    assert set(shares) == set(points)
    subset = data.draw(st.lists(st.sampled_from(points), min_size=t, max_size=n, unique=True))
    assert shamir.reconstruct({x: shares[x] for x in subset}, threshold=t) == secret


@given(secret=st.integers(0, 2**256 - 1), t=st.integers(2, 8), seed=st.integers(0, 2**32 - 1))
def test_shamir_shares_lie_on_a_degree_t_minus_1_polynomial(secret, t, seed):
    """Oracle: interpolate the shares at points 1..t with an independent (Fraction-free, naive O(t^2)
    Newton) scheme and check every other share lies on the same polynomial, of degree exactly ≤ t−1."""
    p = shamir.PRIME
    points = list(range(1, t + 3))
    shares = shamir.split(secret, threshold=t, points=points, seed=_bytes(seed))
    # Newton divided differences on the first t points
    xs, coef = points[:t], [shares[x] for x in points[:t]]
    for j in range(1, t):
        for i in range(t - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) * pow(xs[i] - xs[i - j], -1, p) % p

    def newton(x):
        y = coef[-1]
        for i in range(t - 2, -1, -1):
            y = (y * (x - xs[i]) + coef[i]) % p
        return y

    assert newton(0) == secret
    for x in points[t:]:
        assert newton(x) == shares[x]


@given(secret=st.integers(0, 2**256 - 1), t=st.integers(2, 8), seed=st.integers(0, 2**32 - 1))
def test_shamir_t_minus_1_shares_give_a_wrong_secret(secret, t, seed):
    """A coalition of t−1 holders interpolating what it has recovers a wrong value (for random inputs;
    the chance of hitting the secret is 1/p ≈ 2^-521)."""
    shares = shamir.split(secret, threshold=t, points=list(range(1, t + 1)), seed=_bytes(seed))
    few = dict(itertools.islice(shares.items(), t - 1))
    assert shamir.reconstruct(few, threshold=t - 1) != secret
    with pytest.raises(ValueError, match="need at least threshold"):
        shamir.reconstruct(few, threshold=t)


def test_shamir_t_minus_1_shares_look_the_same_for_every_secret():
    """Hiding, statistically: with t = 3, the two shares at points 1 and 2 (a coalition of t − 1) have the
    same distribution whatever the secret. Over 2000 seeds, the low byte of each share is uniform for
    the secret 0 and for 2^256 − 1 (chi-square, 256 bins, alpha = 1e-3 each, 4 tests: family-wise
    false-alarm rate <= 4e-3; seeds fixed, so CI is deterministic). A sharing with a constant or biased
    coefficient would fail this."""
    for secret in (0, 2**256 - 1):
        lows = {1: [], 2: []}
        for seed in range(2000):
            shares = shamir.split(secret, threshold=3, points=[1, 2, 3], seed=_bytes(seed, "hide"))
            for x in (1, 2):
                lows[x].append(shares[x] & 0xFF)
        for x in (1, 2):
            assert stats.chisquare(np.bincount(lows[x], minlength=256)).pvalue > 1e-3


def test_shamir_detects_a_corrupted_share_and_bad_input():
    shares = shamir.split(42, threshold=2, points=[1, 2, 3], seed=_bytes(1))
    shares[3] = (shares[3] + 1) % shamir.PRIME
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.reconstruct(shares, threshold=2)
    with pytest.raises(ValueError, match="shamir.split: points must be distinct"):
        shamir.split(1, threshold=1, points=[1, 1], seed=_bytes(1))
    with pytest.raises(ValueError, match="shamir.split: points must be an int in"):
        shamir.split(1, threshold=1, points=[0], seed=_bytes(1))
    with pytest.raises(ValueError, match="shamir.split: threshold must be an int in \\[1, 2\\]"):
        shamir.split(1, threshold=3, points=[1, 2], seed=_bytes(1))
    with pytest.raises(ValueError, match="shamir.split: secret must be"):
        shamir.split(shamir.PRIME, threshold=1, points=[1], seed=_bytes(1))
    with pytest.raises(ValueError, match="shamir.split: seed must be 32 bytes"):
        shamir.split(1, threshold=1, points=[1], seed=b"short")
    assert shamir.share_from_bytes(shamir.share_to_bytes(shares[1])) == shares[1]


# ---------------------------------------------------------------- fixed point and the ring

@given(clip=st.floats(1e-3, 1e3), bits=st.integers(2, 40), seed=st.integers(0, 2**32 - 1))
def test_fixed_point_round_trip_within_half_a_step(clip, bits, seed):
    fp = FixedPoint(clip=clip, bits=bits)
    x = np.random.default_rng(seed).uniform(-1.5 * clip, 1.5 * clip, 64)
    q, n_clipped = fp.encode(x)
    assert n_clipped == np.count_nonzero(np.abs(x) > clip)
    assert np.all(np.abs(q) <= fp.max_int)
    err = np.abs(fp.decode(q) - np.clip(x, -clip, clip))
    assert np.all(err <= fp.scale / 2 * (1 + 1e-9) + 1e-12 * clip)


@given(bits=st.integers(2, 30), ring_bits=st.integers(2, 64), n=st.integers(1, 64))
def test_overflow_check_refuses_exactly_the_sums_that_could_wrap(bits, ring_bits, n):
    fp, ring = FixedPoint(clip=1.0, bits=bits), Ring(ring_bits)
    fits = n * fp.max_int <= 2 ** (ring_bits - 1) - 1
    if not fits:
        with pytest.raises(ValueError, match="check_sum_fits: the sum of"):
            check_sum_fits([fp], max_sites=n, ring=ring)
        return
    check_sum_fits([fp], max_sites=n, ring=ring)
    for extreme in (fp.max_int, -fp.max_int):  # the worst sums decode exactly
        q = np.full(3, extreme, dtype=np.int64)
        acc = ring.zeros(3)
        for _ in range(n):
            acc += ring.from_signed(q)
        ring.reduce(acc)
        assert ring.to_signed(acc).tolist() == [n * extreme] * 3


@given(ring_bits=st.integers(2, 64), length=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_ring_packing_round_trips_at_k_bits_per_entry(ring_bits, length, seed):
    ring = Ring(ring_bits)
    a = ring.reduce(np.random.default_rng(seed).integers(0, 2**63, length, dtype=np.uint64).astype(ring.dtype))
    data = ring.pack(a)
    assert len(data) == (length * ring_bits + 7) // 8
    b = ring.unpack(data, length)
    assert b.dtype == ring.dtype and b.tolist() == a.tolist()
    with pytest.raises(ValueError, match="Ring.unpack: expected"):
        ring.unpack(data + b"x", length)


@pytest.mark.parametrize("ring_bits", [18, 41])
def test_ring_packing_across_chunks(ring_bits):
    ring = Ring(ring_bits)
    n = (1 << 18) + 13   # crosses the packing chunk boundary
    a = ring.reduce(np.random.default_rng(ring_bits).integers(0, 2**63, n, dtype=np.uint64).astype(ring.dtype))
    assert np.array_equal(ring.unpack(ring.pack(a), n), a)


def test_fixed_point_and_ring_bad_input():
    with pytest.raises(ValueError, match="FixedPoint: clip must be a finite number"):
        FixedPoint(clip=float("nan"), bits=8)
    with pytest.raises(ValueError, match="FixedPoint: bits must be an int in \\[2, 62\\]"):
        FixedPoint(clip=1.0, bits=63)
    with pytest.raises(ValueError, match="Ring: bits must be an int in \\[2, 64\\]"):
        Ring(65)
    with pytest.raises(ValueError, match="must be finite"):
        FixedPoint(clip=1.0, bits=8).encode(np.array([np.nan]))
    assert FixedPoint.integer(1000).scale == 1.0


# ---------------------------------------------------------------- the protocol

_STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK]


@st.composite
def _rounds(draw, sparse: bool):
    """(n, config, dropouts {stage: sites}, seed): 2–10 sites, a majority threshold, 1–40 entries."""
    n = draw(st.integers(5 if sparse else 2, 10))
    neighbours = draw(st.sampled_from([d for d in (2, 4, 6) if d < n - 1])) if sparse else None
    group = n if neighbours is None else neighbours + 1
    t = draw(st.integers(max(2, group // 2 + 1), group))
    length = draw(st.integers(1, 40))
    ring_bits = draw(st.sampled_from([8, 13, 16, 32, 41, 64]))
    # mostly tolerable dropout counts (≤ n − t), sometimes one too many
    kind = draw(st.sampled_from(["tolerable", "tolerable", "too many", "none"]))
    k = {"none": 0, "too many": n - t + 1,
         "tolerable": draw(st.integers(min(1, n - t), n - t))}[kind]
    dropped = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True))
    stage_of = {u: draw(st.sampled_from(_STAGES)) for u in dropped}
    dropouts = {s: frozenset(u for u in dropped if stage_of[u] == s) for s in _STAGES}
    seed = draw(st.integers(0, 2**32 - 1))
    cfg = SecAggConfig(threshold=t, vector_length=length, ring_bits=ring_bits, neighbours=neighbours)
    return n, cfg, dropouts, seed


def _inputs(cfg: SecAggConfig, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {u: cfg.ring.reduce(rng.integers(0, 2**63, cfg.vector_length, dtype=np.uint64).astype(cfg.ring.dtype))
            for u in range(n)}


def _plain_sum(cfg, inputs, included):
    """The oracle: add the included inputs as Python ints, reduce mod 2^k."""
    return [sum(int(inputs[u][i]) for u in included) % cfg.ring.modulus for i in range(cfg.vector_length)]


def _run(n, cfg, dropouts, seed):
    return run_round(cfg, _inputs(cfg, n, seed), dropouts=dropouts, secrets=_secrets(seed, n),
                     graph_seed=_bytes(seed, "graph"))


def _stage_sets(n, dropouts):
    alive, sets = set(range(n)), []
    for s in _STAGES:
        alive = alive - dropouts[s]
        sets.append(alive)
    return sets  # U1, U2, U3, U4


@settings(max_examples=40)
@given(case=_rounds(sparse=False))
def test_unmasked_sum_equals_plain_sum_with_dropouts_at_every_stage(case):
    """Complete graph: the round succeeds iff ≥ t sites remain at every stage, and then equals the exact
    ring sum of the sites that sent masked input (U3); otherwise RoundFailedError, never a result."""
    n, cfg, dropouts, seed = case
    sets = _stage_sets(n, dropouts)
    event(f"dropouts at stages {sorted(s.name for s, v in dropouts.items() if v)}")
    if any(len(u) < cfg.threshold for u in sets):
        event("round fails")
        with pytest.raises(RoundFailedError) as info:
            _run(n, cfg, dropouts, seed)
        assert info.value.needed == cfg.threshold and info.value.available < cfg.threshold
        return
    event("round completes")
    result, _ = _run(n, cfg, dropouts, seed)
    assert result.included == tuple(sorted(sets[2]))
    assert result.total.dtype == cfg.ring.dtype
    assert result.total.tolist() == _plain_sum(cfg, _inputs(cfg, n, seed), sets[2])


@pytest.mark.parametrize("neighbours", [None, 4])
@pytest.mark.parametrize("stage", _STAGES)
@pytest.mark.parametrize("count", [1, 2, 3])
def test_dropouts_at_each_stage_are_recovered_up_to_the_threshold(stage, count, neighbours):
    """7 sites, t = 4 (3 dropouts tolerable on the complete graph; on the SecAgg+ graph of degree 4 a site's
    neighbourhood has 5 members, so the round may fail — loudly — when ≥ 2 of one neighbourhood drop)."""
    n, cfg = 7, SecAggConfig(threshold=4 if neighbours is None else 3, vector_length=16, ring_bits=24,
                             neighbours=neighbours)
    dropouts = {s: frozenset() for s in _STAGES}
    dropouts[stage] = frozenset(range(1, 1 + 2 * count, 2))   # sites 1, 3, 5
    sets = _stage_sets(n, dropouts)
    try:
        result, _ = _run(n, cfg, dropouts, 3)
    except RoundFailedError:
        assert neighbours is not None, "the complete graph tolerates n − t dropouts"
        return
    assert result.included == tuple(sorted(sets[2]))
    assert result.total.tolist() == _plain_sum(cfg, _inputs(cfg, n, 3), sets[2])


def test_one_dropout_too_many_fails_the_round_at_that_stage():
    n, cfg = 7, SecAggConfig(threshold=4, vector_length=4, ring_bits=24)
    for stage in _STAGES:
        dropouts = {s: frozenset() for s in _STAGES}
        dropouts[stage] = frozenset({0, 2, 4, 6})
        with pytest.raises(RoundFailedError) as info:
            _run(n, cfg, dropouts, 5)
        assert (info.value.available, info.value.needed) == (3, 4)
        assert info.value.stage == stage


@settings(max_examples=40)
@given(case=_rounds(sparse=True))
def test_secagg_plus_sum_is_exact_or_the_round_fails_loudly(case):
    """SecAgg+ (sparse graph): whenever a round completes its sum is exact; when it cannot, it raises
    RoundFailedError. Rounds without dropouts always complete."""
    n, cfg, dropouts, seed = case
    sets = _stage_sets(n, dropouts)
    try:
        result, _ = _run(n, cfg, dropouts, seed)
    except RoundFailedError as e:
        event("round fails")
        assert any(dropouts.values()), "a round without dropouts must not fail"
        assert e.available < e.needed == cfg.threshold
        return
    event(f"completes, dropouts: {bool(any(dropouts.values()))}")
    assert result.included == tuple(sorted(sets[2]))
    assert result.total.tolist() == _plain_sum(cfg, _inputs(cfg, n, seed), sets[2])


@given(n=st.integers(2, 30), d=st.sampled_from([2, 4, 6, 8]), seed=st.integers(0, 2**32 - 1))
def test_harary_graph_is_symmetric_regular_and_loop_free(n, d, seed):
    g = build_graph(range(n), degree=d, graph_seed=_bytes(seed))
    expected = min(d, n - 1)
    for u, nbrs in g.items():
        assert u not in nbrs and len(nbrs) == expected
        assert all(u in g[v] for v in nbrs)


def test_masked_vectors_are_indistinguishable_from_uniform():
    """Chi-square goodness of fit of each masked vector to the uniform law on Z_2^8 (4096 entries,
    256 bins). Inputs are maximally structured (all zeros; all one value). Each test has false-alarm
    rate alpha = 1e-3; 2 inputs x 3 sites = 6 tests, family-wise rate <= 6e-3 — and the seeds are fixed,
    so the outcome is deterministic in CI. Also: the masked vectors of two different inputs are not
    distinguishable by a two-sample chi-square test at the same alpha."""
    cfg = SecAggConfig(threshold=2, vector_length=4096, ring_bits=8)
    views = []
    for value in (0, 200):
        inputs = {u: np.full(4096, value, dtype=np.uint8) for u in range(3)}
        states, dirs = {}, {}
        srv = server_init(cfg, round_id=5, graph_seed=_bytes(value, "g"))
        msgs = {}
        for u in range(3):
            states[u], msgs[u] = site_advertise(cfg, site_id=u, round_id=5, secret=_bytes(value, f"s{u}"))
        srv, directory = server_advertise(srv, msgs)
        msgs = {}
        for u in range(3):
            states[u], msgs[u] = site_share_keys(states[u], directory)
        srv, inboxes = server_share_keys(srv, msgs)
        masked = [site_masked_input(states[u], inboxes[u], inputs[u])[1].vector for u in range(3)]
        for y in masked:
            counts = np.bincount(y, minlength=256)
            assert stats.chisquare(counts).pvalue > 1e-3
        views.append(np.bincount(masked[0], minlength=256))
    table = np.stack(views)
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_same_secrets_replay_the_same_round():
    cfg = SecAggConfig(threshold=2, vector_length=8, ring_bits=16)
    a = _run(3, cfg, {s: frozenset() for s in _STAGES}, 11)
    b = _run(3, cfg, {s: frozenset() for s in _STAGES}, 11)
    np.testing.assert_array_equal(a[0].total, b[0].total)
    st_a, m_a = site_advertise(cfg, site_id=1, round_id=3, secret=_bytes(1))
    st_b, m_b = site_advertise(cfg, site_id=1, round_id=3, secret=_bytes(1))
    assert m_a == m_b
    assert site_advertise(cfg, site_id=1, round_id=4, secret=_bytes(1))[1] != m_a  # fresh keys per round


# ---------------------------------------------------------------- order, honesty and bad input

def _two_stages(cfg, n=3, round_id=0):
    srv = server_init(cfg, round_id=round_id, graph_seed=_bytes(0, "g"))
    states, msgs = {}, {}
    for u in range(n):
        states[u], msgs[u] = site_advertise(cfg, site_id=u, round_id=round_id, secret=_bytes(u))
    srv, directory = server_advertise(srv, msgs)
    msgs = {}
    for u in range(n):
        states[u], msgs[u] = site_share_keys(states[u], directory)
    srv, inboxes = server_share_keys(srv, msgs)
    return srv, states, directory, inboxes


def test_a_site_never_sends_masked_input_before_the_key_stages():
    cfg = SecAggConfig(threshold=2, vector_length=4, ring_bits=16)
    state, _ = site_advertise(cfg, site_id=0, round_id=0, secret=_bytes(0))
    x = np.zeros(4, dtype=np.uint16)
    with pytest.raises(ProtocolError, match="site_masked_input: site 0 is at stage SHARE_KEYS"):
        site_masked_input(state, {}, x)
    with pytest.raises(ProtocolError, match="site_unmask: site 0 is at stage SHARE_KEYS"):
        site_unmask(state, UnmaskRequest(0, (0, 1)))
    srv, states, directory, inboxes = _two_stages(cfg)
    with pytest.raises(ProtocolError, match="site_share_keys: site 0 is at stage MASKED_INPUT"):
        site_share_keys(states[0], directory)        # no stage twice
    # a server that ran the key stages for nobody else cannot get the masked input
    with pytest.raises(RoundFailedError, match="masked input withheld"):
        site_masked_input(states[0], {}, x)


def test_a_forged_or_misrouted_share_is_refused():
    cfg = SecAggConfig(threshold=2, vector_length=4, ring_bits=16)
    srv, states, directory, inboxes = _two_stages(cfg)
    x = np.zeros(4, dtype=np.uint16)
    forged = dict(inboxes[0])
    forged[1] = bytes([forged[1][0] ^ 1]) + forged[1][1:]
    with pytest.raises(ProtocolError, match="does not authenticate"):
        site_masked_input(states[0], forged, x)
    swapped = {1: inboxes[2][1]}   # the share 1 -> 2, replayed to site 0
    with pytest.raises(ProtocolError, match="does not authenticate"):
        site_masked_input(states[0], swapped, x)
    with pytest.raises(ProtocolError, match="non-neighbours"):
        site_masked_input(states[0], {7: b"x"}, x)


def test_a_site_reveals_one_secret_per_peer_and_checks_the_survivor_list():
    cfg = SecAggConfig(threshold=2, vector_length=4, ring_bits=16)
    srv, states, directory, inboxes = _two_stages(cfg)
    x = np.zeros(4, dtype=np.uint16)
    for u in range(3):
        states[u], _ = site_masked_input(states[u], inboxes[u], x)
    _, reply = site_unmask(states[0], UnmaskRequest(0, (0, 1)))
    assert set(reply.seed_shares) == {0, 1} and set(reply.key_shares) == {2}
    assert not set(reply.seed_shares) & set(reply.key_shares)
    with pytest.raises(ProtocolError, match="not in the survivor list"):
        site_unmask(states[0], UnmaskRequest(0, (1, 2)))
    with pytest.raises(ProtocolError, match="repeats a site"):
        site_unmask(states[0], UnmaskRequest(0, (0, 0, 1)))
    with pytest.raises(RoundFailedError, match="only 1 sites sent masked input"):
        site_unmask(states[0], UnmaskRequest(0, (0,)))
    with pytest.raises(ProtocolError, match="round 9"):
        site_unmask(states[0], UnmaskRequest(9, (0, 1)))
    with pytest.raises(ProtocolError, match="never shared keys"):
        # site 0 as if it had only ever heard from site 1; the server then lists site 2 alive
        site_unmask(states[0]._replace(held={1: states[0].held[1]}), UnmaskRequest(0, (0, 1, 2)))


def test_server_refuses_out_of_order_and_malformed_messages():
    cfg = SecAggConfig(threshold=2, vector_length=4, ring_bits=16)
    srv = server_init(cfg, round_id=0, graph_seed=_bytes(0))
    with pytest.raises(ProtocolError, match="server_share_keys: server is at stage ADVERTISE_KEYS"):
        server_share_keys(srv, {})
    with pytest.raises(RoundFailedError, match="only 1 sites advertised keys"):
        st0, m0 = site_advertise(cfg, site_id=0, round_id=0, secret=_bytes(0))
        server_advertise(srv, {0: m0})
    srv, states, directory, inboxes = _two_stages(cfg)
    bad = {u: site_masked_input(states[u], inboxes[u], np.zeros(4, dtype=np.uint16))[1] for u in range(3)}
    bad[1] = bad[1]._replace(vector=np.zeros(5, dtype=np.uint16))
    with pytest.raises(ProtocolError, match="site 1 sent a vector"):
        server_masked_input(srv, bad)
    with pytest.raises(ProtocolError, match="claims site"):
        server_masked_input(srv, {0: bad[2]})


def test_bad_configuration_and_input_name_the_argument():
    with pytest.raises(ValueError, match="SecAggConfig: threshold must be an int >= 2, got 1"):
        SecAggConfig(threshold=1, vector_length=3)
    with pytest.raises(ValueError, match="SecAggConfig: neighbours must be even"):
        SecAggConfig(threshold=2, vector_length=3, neighbours=3)
    with pytest.raises(ValueError, match="SecAggConfig: ring_bits must be an int in \\[2, 64\\], got 65"):
        SecAggConfig(threshold=2, vector_length=3, ring_bits=65)
    with pytest.raises(ValueError, match="SecAggConfig: vector_length must be an int >= 1, got True"):
        SecAggConfig(threshold=2, vector_length=True)
    cfg = SecAggConfig(threshold=2, vector_length=3, ring_bits=12)
    with pytest.raises(ValueError, match="site_advertise: secret must be 32 random bytes"):
        site_advertise(cfg, site_id=0, round_id=0, secret=b"0" * 16)
    with pytest.raises(ValueError, match="site_advertise: site_id must be an int in"):
        site_advertise(cfg, site_id=-1, round_id=0, secret=_bytes(0))
    srv, states, directory, inboxes = _two_stages(cfg)
    with pytest.raises(ValueError, match="site_masked_input: vector must be ring elements of dtype uint16"):
        site_masked_input(states[0], inboxes[0], np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="entries >= 2\\*\\*12"):
        site_masked_input(states[0], inboxes[0], np.full(3, 5000, dtype=np.uint16))
    # a threshold that is not a strict majority of the roster is refused before any share is sent
    cfg_low = SecAggConfig(threshold=2, vector_length=3)
    states = {u: site_advertise(cfg_low, site_id=u, round_id=0, secret=_bytes(u)) for u in range(4)}
    _, directory = server_advertise(server_init(cfg_low, round_id=0, graph_seed=_bytes(0)),
                                    {u: m for u, (_, m) in states.items()})
    with pytest.raises(ValueError, match="strict majority"):
        site_share_keys(states[0][0], directory)


# ---------------------------------------------------------------- over a bytes transport

@settings(max_examples=10)
@given(n=st.integers(3, 6), drop=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_a_round_through_the_codec_equals_the_plain_sum(n, drop, seed):
    """Every message encoded to a record and decoded, the site state kept only as bytes between stages
    (what a site process keeps in its own storage): the result is still the exact sum, with site
    ``drop`` (if < n) dropping after sharing keys."""
    from dpfunc.secagg import codec

    cfg = SecAggConfig(threshold=n // 2 + 1, vector_length=7, ring_bits=20)
    inputs = _inputs(cfg, n, seed)
    kept = {}
    srv = server_init(cfg, round_id=2, graph_seed=_bytes(seed))
    msgs = {}
    for u in range(n):
        s, m = site_advertise(cfg, site_id=u, round_id=2, secret=_bytes(seed, str(u)))
        kept[u], msgs[u] = codec.site_state_to_bytes(s), codec.decode(codec.encode(m))
    srv, directory = server_advertise(srv, msgs)
    wire = codec.encode(directory)
    msgs = {}
    for u in range(n):
        s, m = site_share_keys(codec.site_state_from_bytes(kept[u]), codec.decode(wire))
        kept[u], msgs[u] = codec.site_state_to_bytes(s), codec.decode(codec.encode(m))
    srv, inboxes = server_share_keys(srv, msgs)
    msgs = {}
    for u in inboxes:
        if u == drop:
            continue
        s, m = site_masked_input(codec.site_state_from_bytes(kept[u]), codec.decode_inbox(codec.encode_inbox(inboxes[u])), inputs[u])
        record = codec.encode(m, ring_bits=cfg.ring_bits)
        assert len(record["vector"]) == (7 * 20 + 7) // 8     # packed at 20 bits, not 32
        kept[u], msgs[u] = codec.site_state_to_bytes(s), codec.decode(record)
    srv, request = server_masked_input(srv, msgs)
    wire = codec.encode(request)
    msgs = {}
    for u in request.survivors:
        s, m = site_unmask(codec.site_state_from_bytes(kept[u]), codec.decode(wire))
        msgs[u] = codec.decode(codec.encode(m))
    from dpfunc.secagg import server_unmask

    _, result = server_unmask(srv, msgs)
    assert result.total.tolist() == _plain_sum(cfg, inputs, [u for u in range(n) if u != drop])
    with pytest.raises(ProtocolError, match="codec.decode: malformed 'masked' record"):
        codec.decode({"kind": "masked", "site": 0})
