"""Adaptive clipping (issue 20): convergence, the count's noise, sensitivity at every step, the ledger's
ε, calibration, the fast engine against the vmap oracle, checkpoints and refusals.

Torch randomness comes from seeds drawn as hypothesis data (``dpfunc.Key`` / local generators).
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpfunc import (
    AdaptiveClipping,
    AdaptiveClippingState,
    FlatClipping,
    Key,
    PerLayerClipping,
    accounting,
    adaptive_dpsgd,
    clip_and_sum,
    dpsgd,
    make_step,
    privacy_ledger,
    vmap_engine,
)
from dpfunc.adaptive_clipping import (
    AdaptiveDPConfig,
    _unclipped_counts,
    adaptive_dp_aggregate,
    find_adaptive_state,
    gradient_noise_multiplier,
)

seeds = st.integers(0, 2**32 - 1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _rule(c0=1.0, gamma=0.5, eta=0.2, sigma_b=0.0, **kw):
    return AdaptiveClipping(c0, target_quantile=gamma, learning_rate=eta, count_noise_multiplier=sigma_b, **kw)


def _norm_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


# --------------------------------------------------------------------------- convergence


@settings(max_examples=6)
@given(seed=seeds, mu=st.floats(-3, 3), spread=st.floats(0.2, 1.5), gamma=st.floats(0.2, 0.8),
       start=st.floats(-2.3, 2.3))
def test_clip_norm_converges_to_the_target_quantile_and_stays_positive(seed, mu, spread, gamma, start):
    """Norms ~ LogNormal(μ, s) fresh each step, σ_count = 0: C → the γ-quantile exp(μ + s·Φ⁻¹(γ)).

    Checked on the true CDF: Φ((log C̄ − μ)/s) within 0.06 of γ, where log C̄ is the mean of log C over the
    last 150 of 400 steps (start up to 10× away from the median). C is finite and > 0 at every step."""
    b, steps = 256, 400
    gen = torch.Generator().manual_seed(seed)
    rule = _rule(math.exp(mu + start), gamma=gamma)
    tx = adaptive_dp_aggregate(AdaptiveDPConfig(rule, 0.0, 1.0, b), Key(seed))
    state = tx.init({"w": torch.zeros(1)})
    logs = []
    for _ in range(steps):
        norms = torch.exp(mu + spread * torch.randn(b, generator=gen, dtype=torch.float64))
        clipped = clip_and_sum({"w": norms[:, None]}, state.dp.clipping)
        _, state = tx.update(clipped, state)
        c = state.max_grad_norm
        assert 0 < c < math.inf
        logs.append(math.log(c))
    tail = sum(logs[-150:]) / 150
    assert abs(_norm_cdf((tail - mu) / spread) - gamma) < 0.06


@settings(max_examples=3)
@given(seed=seeds, gamma=st.sampled_from([0.3, 0.5, 0.7]))
def test_per_layer_bounds_follow_each_groups_own_quantile(seed, gamma):
    """Two layers whose norms differ by 100×: each group's bound converges to its own γ-quantile."""
    b = 200
    gen = torch.Generator().manual_seed(seed)
    rule = _rule(1.0, gamma=gamma, per_layer=True)
    tx = adaptive_dp_aggregate(AdaptiveDPConfig(rule, 0.0, 1.0, b), Key(seed))
    params = {"a.weight": torch.zeros(1), "b.weight": torch.zeros(1)}
    state = tx.init(params)
    assert isinstance(state.dp.clipping, PerLayerClipping) and set(state.max_grad_norm) == {"a", "b"}
    scales = {"a": 0.05, "b": 5.0}
    tails = {"a": [], "b": []}
    for t in range(300):
        grads = {f"{g}.weight": (scales[g] * torch.exp(0.5 * torch.randn(b, generator=gen, dtype=torch.float64)))[:, None]
                 for g in scales}
        _, state = tx.update(clip_and_sum(grads, state.dp.clipping), state)
        if t >= 180:
            for g in scales:
                tails[g].append(math.log(state.max_grad_norm[g]))
    for g, scale in scales.items():
        mean_log = sum(tails[g]) / len(tails[g])
        assert abs(_norm_cdf((mean_log - math.log(scale)) / 0.5) - gamma) < 0.07


# --------------------------------------------------------------------------- the count's noise


@settings(max_examples=3)
@given(seed=seeds, sigma_b=st.sampled_from([0.5, 3.0, 20.0]))
def test_noisy_count_variance_matches_count_noise_multiplier_chi2(seed, sigma_b):
    """The released count minus the true centred count is N(0, σ_b²): Σ z²/σ_b² ~ χ²(N).

    N = 600 steps with η = 0 (C fixed, so the true count is known); two-sided χ² test at a false-alarm
    rate of 1e-4 per example (3 examples: ≤ 3e-4 per run), plus the mean within 4.5 standard errors
    (false-alarm rate 7e-6 per example)."""
    from scipy.stats import chi2

    n_steps, b, m = 600, 40, 40.0
    gen = torch.Generator().manual_seed(seed)
    rule = _rule(1.0, eta=0.0, sigma_b=sigma_b)
    tx = adaptive_dp_aggregate(AdaptiveDPConfig(rule, 0.0, 1.0, 40), Key(seed))
    state = tx.init({"w": torch.zeros(1)})
    norms = torch.rand(b, generator=gen, dtype=torch.float64) * 2
    clipped = clip_and_sum({"w": norms[:, None]}, state.dp.clipping)
    centred = float(_unclipped_counts(clipped, {"": 1.0})[0])
    assert centred == float((norms <= 1.0).sum()) - b / 2
    noise = []
    for _ in range(n_steps):
        _, state = tx.update(clipped, state)
        noise.append((state.unclipped_fraction[0] - 0.5) * m - centred)
    z = torch.tensor(noise, dtype=torch.float64) / sigma_b
    stat = float((z ** 2).sum())
    alpha = 1e-4
    assert chi2.ppf(alpha / 2, n_steps) < stat < chi2.ppf(1 - alpha / 2, n_steps)
    assert abs(float(z.mean())) < 4.5 / math.sqrt(n_steps)


# --------------------------------------------------------------------------- sensitivity at every step


def _linear_loss(p, b, x, y):
    return (p["fc.weight"] @ x + p["fc.bias"] - y).pow(2).sum() + 0.1 * (p["out.weight"] * x[:2]).sum()


@settings(max_examples=6)
@given(seed=seeds, per_layer=st.booleans(), c0=st.sampled_from([0.05, 1.0, 20.0]), data=st.data())
def test_sensitivity_of_the_clipped_sum_and_the_joint_release_at_every_step(seed, per_layer, c0, data):
    """At each step t, for the batch and the batch without one example: ‖Σ_D − Σ_D'‖ ≤ C_t (the current
    bound; per-layer √ΣC_g²), the ClippedSum reports exactly that bound, and the joint release
    (Δsum/(σ_grad·C_t), Δcount/σ_b) moves by ≤ 1/σ — the composed mechanism's sensitivity at σ."""
    gen = torch.Generator().manual_seed(seed)
    b, sigma = 12, 1.3
    x, y = torch.randn(b, 4, generator=gen) * 3, torch.randn(b, 2, generator=gen)
    params = {"fc.weight": torch.randn(2, 4, generator=gen), "fc.bias": torch.zeros(2), "out.weight": torch.randn(2, generator=gen)}
    rule = _rule(c0, eta=0.5, sigma_b=4.0, per_layer=per_layer)
    tx = adaptive_dpsgd(0.05, noise_multiplier=sigma, clipping=rule, sampling_rate=0.5, num_examples=2 * b, key=Key(seed))
    engine = vmap_engine(_linear_loss, clipping=rule)
    state = tx.init(params)
    step = make_step(None, tx, engine=engine)
    for t in range(4):
        current = find_adaptive_state(state).dp.clipping
        names = list(params)
        bound = current.sensitivity(names)
        j = data.draw(st.integers(0, b - 1), label=f"removed example at step {t}")
        keep = torch.arange(b) != j
        full = engine(params, {}, (x, y), None, clipping=current).grads
        nbr = engine(params, {}, (x[keep], y[keep]), None, clipping=current).grads
        assert full.sensitivity == pytest.approx(bound, rel=1e-12)
        diff = math.sqrt(sum(float((full.grads[k] - nbr.grads[k]).pow(2).sum()) for k in names))
        assert diff <= bound * (1 + 1e-5)
        groups = len(current.group_bounds(names))
        sigma_grad = gradient_noise_multiplier(sigma, rule.count_noise_multiplier, groups)
        bounds = current.group_bounds(names)
        dcount = _unclipped_counts(full, bounds) - _unclipped_counts(nbr, bounds)
        assert torch.all(dcount.abs() == 0.5)  # the centred term of one example is ±½
        joint = math.sqrt((diff / (sigma_grad * bound)) ** 2 + float((dcount / rule.count_noise_multiplier).pow(2).sum()))
        assert joint <= (1 / sigma) * (1 + 1e-5)
        params, state, _ = step(params, state, (x, y))


# --------------------------------------------------------------------------- accounting


@settings(max_examples=4)
@given(seed=seeds, sigma=st.floats(0.6, 3.0), q=st.sampled_from([0.01, 0.1, 0.5]), steps=st.integers(1, 30))
def test_ledger_epsilon_equals_the_accountant_for_the_composed_mechanism(seed, sigma, q, steps):
    """The ledger holds ONE Gaussian phase at the advertised σ; its ε is the accountant's ε of the
    Poisson-subsampled Gaussian at σ, q, T — and the gradient noise is σ_grad > σ (the count's share)."""
    n = 100
    rule = _rule(1.0, sigma_b=n * q / 20 + sigma)  # above the floor σ/2
    tx = adaptive_dp_aggregate(AdaptiveDPConfig(rule, sigma, q, n), Key(seed))
    state = tx.init({"w": torch.zeros(2)})
    g = torch.randn(5, 2, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        _, state = tx.update(clip_and_sum({"w": g}, state.dp.clipping), state)
    ledger = privacy_ledger(state)
    assert [(p.noise_multiplier, p.sampling_rate, p.steps) for p in ledger.phases] == [(sigma, q, steps)]
    delta = 1e-5
    assert accounting.epsilon(ledger, delta) == pytest.approx(accounting.dpsgd_epsilon(sigma, q, steps, delta), rel=1e-9)
    sigma_grad = gradient_noise_multiplier(sigma, rule.count_noise_multiplier)
    assert sigma_grad > sigma
    assert sigma_grad ** -2 + (2 * rule.count_noise_multiplier) ** -2 == pytest.approx(sigma ** -2, rel=1e-12)


def test_calibration_works_unchanged_with_adaptive_clipping():
    """σ from noise_multiplier_for(ε, δ, q, T) is what the adaptive ledger records: after T steps ε ≤ target, within 1%."""
    eps, delta, q, steps, n = 2.0, 1e-5, 0.05, 20, 200
    sigma = accounting.noise_multiplier_for(eps, delta, q, steps)
    rule = _rule(0.1, sigma_b=2.0)  # above σ/2 (n·q/20 = 0.5 would be refused: see the test below)
    tx = adaptive_dpsgd(0.1, noise_multiplier=sigma, clipping=rule, sampling_rate=q, num_examples=n, key=Key(1))
    step = make_step(lambda p, b, x: (p["w"] * x).sum(), tx)
    params, state = {"w": torch.zeros(3)}, tx.init({"w": torch.zeros(3)})
    for t in range(steps):
        params, state, _ = step(params, state, (torch.randn(10, 3, generator=torch.Generator().manual_seed(t)),))
    spent = accounting.epsilon(privacy_ledger(state), delta)
    assert spent <= eps and spent >= 0.99 * eps


def test_learning_rate_zero_is_flat_dpsgd_at_the_adjusted_sigma():
    """η = 0: C never moves, and the update equals dpsgd's at σ_grad with the same key, bit for bit."""
    sigma, sigma_b, q, n = 1.1, 2.0, 0.25, 16
    rule = _rule(0.7, eta=0.0, sigma_b=sigma_b)
    ada = adaptive_dpsgd(0.3, noise_multiplier=sigma, clipping=rule, sampling_rate=q, num_examples=n, key=Key(5))
    flat = dpsgd(0.3, noise_multiplier=gradient_noise_multiplier(sigma, sigma_b), max_grad_norm=0.7, sampling_rate=q,
                 num_examples=n, key=Key(5))
    loss = lambda p, b, x: (p["w"] * x).sum().sin()  # noqa: E731
    pa = pf = {"w": torch.ones(3)}
    sa, sf = ada.init(pa), flat.init(pf)
    step_a, step_f = make_step(loss, ada), make_step(loss, flat)
    for t in range(4):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(t)) * 3
        pa, sa, _ = step_a(pa, sa, (x,))
        pf, sf, _ = step_f(pf, sf, (x,))
        assert torch.equal(pa["w"], pf["w"])
    assert find_adaptive_state(sa).max_grad_norm == 0.7


# --------------------------------------------------------------------------- fast engine = vmap oracle


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).flatten(1))


@settings(max_examples=4)
@given(seed=seeds, per_layer=st.booleans(), c0=st.sampled_from([0.1, 10.0]))
def test_fast_engine_equals_vmap_oracle_with_adaptive_clipping(seed, per_layer, c0):
    """Eight adaptive steps with fast_engine and with vmap_engine (same keys, padding rows in the batch):
    the same clip-norm trajectory and the same parameters (float32 tolerance)."""
    from dpfunc.bridge import functionalize
    from dpfunc.bridge.fast import fast_engine

    torch.manual_seed(0)  # test code only: the module's init (the library never touches global RNG)
    gen = torch.Generator().manual_seed(seed)
    module = _Net()
    apply_fn, params, buffers = functionalize(module)
    rule = _rule(c0, eta=0.3, sigma_b=2.0, per_layer=per_layer)

    def loss_one(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x[None]), y[None])

    engines = {
        "fast": fast_engine(module, lambda out, y: F.cross_entropy(out, y, reduction="none"), rule),
        "vmap": vmap_engine(loss_one, clipping=rule),
    }
    runs = {}
    xs = [torch.randn(7, 1, 6, 6, generator=gen) for _ in range(8)]
    ys = [torch.randint(0, 2, (7,), generator=gen) for _ in range(8)]
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    for name, engine in engines.items():
        tx = adaptive_dpsgd(0.5, noise_multiplier=1.0, clipping=rule, sampling_rate=0.2, num_examples=25, key=Key(seed))
        p, s = dict(params), tx.init(params)
        step = make_step(None, tx, engine=engine)
        norms = []
        for x, y in zip(xs, ys):
            p, s, _ = step(p, s, (x, y), mask=mask, buffers=buffers)
            norms.append(find_adaptive_state(s).max_grad_norm)
        runs[name] = (p, norms)
    (pf, nf), (pv, nv) = runs["fast"], runs["vmap"]
    for a, b in zip(nf, nv):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)
        else:
            assert a == pytest.approx(b, rel=1e-6)
    for k in pf:
        torch.testing.assert_close(pf[k], pv[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- state, checkpoints, refusals


def test_checkpoint_round_trip_restores_the_clip_norm_and_continues_identically():
    from dpfunc.bridge.checkpoint import load_checkpoint, save_checkpoint

    rule = _rule(0.2, sigma_b=3.0)
    tx = adaptive_dpsgd(0.1, noise_multiplier=1.0, clipping=rule, sampling_rate=0.5, num_examples=20, key=Key(3))
    step = make_step(lambda p, b, x: (p["w"] * x).sum().pow(2), tx)
    data = [(torch.randn(9, 2, generator=torch.Generator().manual_seed(t)),) for t in range(6)]
    p, s = {"w": torch.ones(2)}, tx.init({"w": torch.ones(2)})
    for batch in data[:3]:
        p, s, _ = step(p, s, batch)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.pt")
        save_checkpoint(path, {"params": p, "opt_state": s})
        loaded = load_checkpoint(path)
    p2, s2 = loaded["params"], loaded["opt_state"]
    assert isinstance(s2[0], AdaptiveClippingState)
    assert s2[0].max_grad_norm == s[0].max_grad_norm and s2[0].dp.ledger == s[0].dp.ledger and s2[0].rule == rule
    for batch in data[3:]:
        p, s, _ = step(p, s, batch)
        p2, s2, _ = step(p2, s2, batch)
    assert torch.equal(p["w"], p2["w"]) and s[0].max_grad_norm == s2[0].max_grad_norm


def test_a_flat_state_is_refused_by_the_adaptive_transform():
    """A DPAggregateState (a flat run's state, or an old checkpoint without a clip norm) is refused clearly."""
    rule = _rule(1.0)
    flat = dpsgd(0.1, noise_multiplier=0.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=4, key=Key(0))
    ada = adaptive_dpsgd(0.1, noise_multiplier=0.0, clipping=rule, sampling_rate=0.5, num_examples=4, key=Key(0))
    params = {"w": torch.zeros(2)}
    clipped = clip_and_sum({"w": torch.ones(3, 2)}, FlatClipping(1.0))
    with pytest.raises(TypeError, match="AdaptiveClippingState.*DPAggregateState comes from flat clipping"):
        ada.update(clipped, flat.init(params), params)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(initial_max_grad_norm=0.0), "initial_max_grad_norm must be a finite number > 0, got 0.0"),
        (dict(initial_max_grad_norm=math.inf), "initial_max_grad_norm must be a finite number > 0"),
        (dict(target_quantile=1.5), "target_quantile must be in [0, 1], got 1.5"),
        (dict(learning_rate=-0.1), "learning_rate must be a finite number >= 0"),
        (dict(count_noise_multiplier=math.nan), "count_noise_multiplier must be a finite number >= 0"),
        (dict(per_parameter=True), "per_parameter=True groups per-layer clipping by parameter; it needs per_layer=True"),
    ],
)
def test_bad_arguments_are_refused(kwargs, needle):
    args = dict(initial_max_grad_norm=1.0, target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=1.0) | kwargs
    with pytest.raises(ValueError) as err:
        AdaptiveClipping(**args)
    assert needle in str(err.value) and "AdaptiveClipping" in str(err.value)


def test_a_count_noise_too_small_for_the_adjustment_is_refused():
    """σ_b ≤ σ√G/2: refused at build time (flat) or at init (per-layer, once G is known), naming the floor."""
    with pytest.raises(ValueError, match=r"adaptive_dpsgd: .*σ_b = 0.5 is too small .* σ·√G/2 = 0.5"):
        adaptive_dpsgd(0.1, noise_multiplier=1.0, clipping=_rule(sigma_b=0.5), sampling_rate=0.1, num_examples=10, key=Key(0))
    tx = adaptive_dpsgd(0.1, noise_multiplier=1.0, clipping=_rule(sigma_b=0.6, per_layer=True), sampling_rate=0.1,
                        num_examples=10, key=Key(0))
    with pytest.raises(ValueError, match=r"with 2 count\(s\) per step.*σ·√G/2 = 0.707"):
        tx.init({"a.weight": torch.zeros(1), "b.weight": torch.zeros(1)})
    assert gradient_noise_multiplier(0.0, 0.0) == 0.0  # non-private: an exact count is allowed


def test_engines_built_for_adaptive_clipping_need_the_current_bound():
    from dpfunc.bridge.fast import fast_engine

    rule = _rule(1.0)
    engine = vmap_engine(lambda p, b, x: (p["w"] * x).sum(), clipping=rule)
    batch = (torch.ones(2, 2),)
    with pytest.raises(TypeError, match="vmap_engine: built with AdaptiveClipping, so each call needs the current bound"):
        engine({"w": torch.zeros(2)}, {}, batch, None)
    with pytest.raises(ValueError, match="is not a bound of this engine"):
        engine({"w": torch.zeros(2)}, {}, batch, None, clipping=PerLayerClipping(1.0))
    out = engine({"w": torch.zeros(2)}, {}, batch, None, clipping=FlatClipping(0.5))
    assert out.grads.sensitivity == 0.5
    fast = fast_engine(nn.Linear(2, 1), lambda out, y: (out[:, 0] - y) ** 2, rule)
    with pytest.raises(TypeError, match="fast_engine: built with AdaptiveClipping"):
        fast({"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}, {}, (torch.ones(2, 2), torch.ones(2)), None)


def test_train_config_and_cli_flags(capsys):
    from dpfunc.cli import main
    from dpfunc.train import TrainConfig

    cfg = TrainConfig(clipping="adaptive", batch_size=128)
    assert cfg.count_noise_multiplier == 128 / 20 and cfg.adaptive_rule().initial_max_grad_norm == cfg.max_grad_norm
    assert TrainConfig().adaptive_rule() is None
    with pytest.raises(ValueError, match="clipping must be one of"):
        TrainConfig(clipping="auto")
    with pytest.raises(ValueError, match="target_quantile must be in"):
        TrainConfig(clipping="adaptive", target_quantile=2.0)
    try:
        rc = main(["train", "--target-quantile", "0.3", "--clip-lr", "0.1"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "--target-quantile, --clip-lr only apply with --clipping adaptive" in capsys.readouterr().err
    from dpfunc.cli import _train_config, build_parser

    plain = _train_config(build_parser().parse_args(["train", "--clipping", "adaptive", "--no-clip-normalize"]))
    assert plain.clip_normalize is False and _train_config(build_parser().parse_args(["train"])).clip_normalize is True


# --------------------------------------------------------------------------- the bridge


def _bridge_run(mode: str, steps: int = 4, state_dict=None):
    from torch.utils.data import DataLoader, TensorDataset

    from dpfunc.bridge import make_private

    g = torch.Generator().manual_seed(11)
    X, Y = torch.randn(48, 5, generator=g) * 4, torch.randint(0, 3, (48,), generator=g)
    torch.manual_seed(0)  # test code only: the module's init
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model, opt, loader = make_private(net, opt, DataLoader(TensorDataset(X, Y), batch_size=12), key=Key(4),
                                      noise_multiplier=0.9, max_grad_norm=20.0, clipping="adaptive", grad_sample_mode=mode)
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    norms = []
    if steps == 0:
        return net, opt, norms
    for t, (x, y) in enumerate(loader):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        norms.append(find_adaptive_state(opt._dp_state).max_grad_norm)
        if t + 1 == steps:
            break
    return net, opt, norms


def test_make_private_adaptive_fast_equals_vmap_and_state_dict_restores_the_clip_norm():
    """make_private(clipping="adaptive"): C moves from 20 toward the median norm, identically with the fast
    and the vmap engine; the ledger records σ; a state_dict carries the clip norm and refuses to lose it."""
    net_f, opt_f, norms_f = _bridge_run("fast")
    net_v, opt_v, norms_v = _bridge_run("vmap")
    assert norms_f == pytest.approx(norms_v, rel=1e-6) and norms_f[-1] < 20.0
    for pf, pv in zip(net_f.parameters(), net_v.parameters()):
        torch.testing.assert_close(pf, pv, rtol=1e-4, atol=1e-5)
    assert len(norms_f) == 4 and [(p.noise_multiplier, p.steps) for p in opt_f.ledger.phases] == [(0.9, 4)]
    rule = opt_f.config.clipping
    assert isinstance(rule, AdaptiveClipping) and rule.count_noise_multiplier == pytest.approx(12 / 20)
    sd = opt_f.state_dict()
    assert sd["dp_state"]["max_grad_norm"] == norms_f[-1] and sd["config"]["clipping"] == "AdaptiveClipping"
    _, opt_r, _ = _bridge_run("fast", steps=0, state_dict=sd)
    assert find_adaptive_state(opt_r._dp_state).max_grad_norm == norms_f[-1] and opt_r.steps == 4
    old = {**sd, "dp_state": {k: v for k, v in sd["dp_state"].items() if k != "max_grad_norm"}}
    with pytest.raises(ValueError, match="holds no adaptive clip norm"):
        _bridge_run("fast", steps=0, state_dict=old)
