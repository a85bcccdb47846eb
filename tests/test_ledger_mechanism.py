"""Ledger phases record their noise mechanism, and ε is computed for what was released (issue 18).

The privacy bug this pins: a secure-mode run (discrete Gaussian noise) recorded its steps as plain
``(σ, q)`` phases, so ``dpfunc.epsilon(ledger, δ)`` returned the continuous Gaussian's ε — up to ~17 %
below the proven discrete-Gaussian bound. Now a phase names its :class:`Mechanism`; the default
accountant is PLD for Gaussian phases and the discrete Gaussian's RDP bound when any phase is discrete;
PLD and GDP refuse discrete phases; old ledgers and checkpoints still load.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dpfunc import Key, PrivacyLedger, epsilon
from dpfunc.accounting import (
    GDP,
    PLD,
    RDP,
    ComposedEvent,
    DiscreteGaussianEvent,
    Mechanism,
    Phase,
    PoissonSampledEvent,
    PrivacyBudget,
    PrivacyBudgetExceededError,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    delta,
    epsilon_report,
    rdp_poisson_gaussian,
)
from dpfunc.accounting.discrete_gaussian import (
    DG_ORDERS,
    _zhu_wang,
    discrete_gaussian_epsilon,
    ledger_epsilon,
    rdp_poisson_discrete_gaussian,
    rdp_poisson_discrete_gaussian_at,
)
from dpfunc.bridge.checkpoint import from_plain, load_checkpoint, save_checkpoint, to_plain
from dpfunc.clipping import FlatClipping, clip_and_sum
from dpfunc.private import DPConfig, dp_aggregate, privacy_ledger, with_discrete_gaussian_ledger

DG = Mechanism.DISCRETE_GAUSSIAN


def _secure_steps(sigma: float, q: float, steps: int, budget=None):
    """``steps`` real secure-mode updates of dp_aggregate on a toy clipped sum; returns the final state."""
    pytest.importorskip("cryptography")
    tx = dp_aggregate(DPConfig(1.0, sigma, q, 8), Key(0), budget=budget, secure=True)
    state = tx.init({"w": torch.zeros(2)})
    clipped = clip_and_sum({"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}, FlatClipping(1.0))
    for _ in range(steps):
        _, state = tx.update(clipped, state)
    return state


def test_secure_dp_aggregate_records_discrete_gaussian_phases_and_epsilon_uses_their_bound():
    state = _secure_steps(1.1, 0.25, 3)
    ledger = state.ledger
    assert ledger.phases == (Phase(1.1, 0.25, 3, DG),)
    bound = discrete_gaussian_epsilon(1.1, 0.25, 3, 1e-5)
    assert epsilon(ledger, 1e-5) == pytest.approx(bound, rel=1e-12)
    # The continuous Gaussian's ε of the same (σ, q, T) is strictly smaller: the old, under-reported value.
    continuous = epsilon(PrivacyLedger().step(1.1, 0.25, 3), 1e-5)
    assert continuous < bound
    rep = epsilon_report(ledger, 1e-5)
    assert rep.method == "rdp" and rep.epsilon == pytest.approx(bound, rel=1e-12)


def test_default_path_still_records_gaussian_phases():
    tx = dp_aggregate(DPConfig(1.0, 1.1, 0.25, 8), Key(0))
    state = tx.init({"w": torch.zeros(2)})
    _, state = tx.update(clip_and_sum({"w": torch.ones(2, 2)}, FlatClipping(1.0)), state)
    assert state.ledger.phases == (Phase(1.1, 0.25, 1),)
    assert state.ledger.phases[0].mechanism is Mechanism.GAUSSIAN
    assert epsilon_report(state.ledger, 1e-5).method == "pld"


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.6, 5.0), q=st.floats(1e-3, 1.0), steps=st.integers(1, 3000),
       delta_=st.sampled_from([1e-5, 1e-6, 1e-8]))
def test_epsilon_of_a_discrete_ledger_equals_the_discrete_bound_and_is_never_the_continuous_one(sigma, q, steps, delta_):
    ledger = PrivacyLedger().step(sigma, q, steps, mechanism=DG)
    eps = epsilon(ledger, delta_)
    assert eps == pytest.approx(discrete_gaussian_epsilon(sigma, q, steps, delta_), rel=1e-12)
    assert eps == pytest.approx(ledger_epsilon(ledger, delta_), rel=1e-12)
    # never below the continuous Gaussian's RDP ε at the same orders (the discrete bound dominates it)
    assert eps >= epsilon(PrivacyLedger().step(sigma, q, steps), delta_, RDP(orders=DG_ORDERS)) * (1 - 1e-12)


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.3, 20.0), q=st.floats(1e-4, 0.999), order=st.integers(2, 200))
def test_zhu_wang_transcription_reduces_to_the_exact_subsampled_gaussian_without_the_factor_3(sigma, q, order):
    """With the generic factor 3 replaced by 1 and ε(l) = l/(2σ²), Thm. 6's sum is term for term the exact
    Poisson-subsampled Gaussian RDP (Mironov et al. 2019) at integer orders: checks the transcription of
    every common part against the independently written continuous accountant."""
    assert _zhu_wang(sigma, q, order, 1.0) == pytest.approx(rdp_poisson_gaussian(sigma, q, float(order)), rel=1e-9, abs=1e-12)
    assert rdp_poisson_discrete_gaussian(sigma, q, order) >= _zhu_wang(sigma, q, order, 1.0)


@settings(max_examples=20, deadline=None)
@given(sigma=st.floats(0.5, 10.0), q=st.floats(1e-3, 1.0), order=st.floats(1.01, 300.0))
def test_any_order_bound_rounds_up_to_an_integer_order(sigma, q, order):
    value = rdp_poisson_discrete_gaussian_at(sigma, q, order)
    if q == 1.0:
        assert value == pytest.approx(order / (2 * sigma**2))
    else:
        assert value == rdp_poisson_discrete_gaussian(sigma, q, max(2, math.ceil(order)))
    assert rdp_poisson_discrete_gaussian_at(0.0, q, order) == math.inf
    assert rdp_poisson_discrete_gaussian_at(math.inf, q, order) == 0.0


@pytest.mark.filterwarnings("ignore:GDP")
def test_mixed_ledger_composes_both_and_explicit_pld_or_gdp_is_refused():
    mixed = PrivacyLedger().step(1.0, 0.01, 200).step(1.0, 0.01, 100, mechanism=DG)
    assert [p.mechanism for p in mixed.phases] == [Mechanism.GAUSSIAN, DG]  # same (σ, q): not merged
    eps = epsilon(mixed, 1e-5)
    only_gauss = epsilon(PrivacyLedger().step(1.0, 0.01, 200), 1e-5, RDP(orders=DG_ORDERS))
    only_dg = epsilon(PrivacyLedger().step(1.0, 0.01, 100, mechanism=DG), 1e-5)
    assert eps > max(only_gauss, only_dg)
    assert eps == pytest.approx(epsilon(mixed, 1e-5, RDP(orders=DG_ORDERS)), rel=1e-12)
    all_dg = epsilon(mixed.with_mechanism(DG), 1e-5)
    assert eps <= all_dg  # the Gaussian phases are accounted as Gaussian, not worse
    for bad in ("pld", PLD(), "gdp", GDP()):
        with pytest.raises(ValueError, match="discrete-Gaussian"):
            epsilon(mixed, 1e-5, bad)
    with pytest.raises(ValueError, match="discrete-Gaussian"):
        delta(mixed, 3.0, "pld")
    assert 0 < delta(mixed, eps * 1.01) <= 1e-5 * 1.01
    with pytest.raises(ValueError, match="discrete-Gaussian"):
        epsilon(mixed, 1e-5, value_discretization_interval=1e-3)  # PLD options without a method


def test_discrete_events_outside_poisson_are_refused_and_accounted_when_direct():
    with pytest.raises(ValueError, match="GaussianEvent"):
        SampledWithoutReplacementEvent(10, 100, DiscreteGaussianEvent(1.0))
    one = SelfComposedEvent(DiscreteGaussianEvent(2.0), 5)  # unsampled: 5/(2σ²)-zCDP, RDP α·5/8
    ev = epsilon(ComposedEvent((one,)), 1e-5)
    assert ev == pytest.approx(discrete_gaussian_epsilon(2.0, 1.0, 5, 1e-5), rel=1e-12)
    assert epsilon(SelfComposedEvent(PoissonSampledEvent(0.1, DiscreteGaussianEvent(math.inf)), 7), 1e-5) == 0.0


def test_ledger_dict_round_trip_keeps_the_mechanism_and_reads_the_old_format():
    ledger = PrivacyLedger().step(1.0, 0.5, 2).step(1.0, 0.5, 3, mechanism="discrete_gaussian")
    d = ledger.to_dict()
    assert d == {"phases": [[1.0, 0.5, 2], [1.0, 0.5, 3, "discrete_gaussian"]]}
    assert PrivacyLedger.from_dict(d) == ledger
    assert PrivacyLedger.from_dict({"phases": [[2.0, 0.1, 4]]}).phases == (Phase(2.0, 0.1, 4),)
    for bad in ([[1.0, 0.5, 2, "laplace"]], [[1.0, 0.5]], [[1.0, 0.5, 2, "gaussian", 1]]):
        with pytest.raises(ValueError, match="PrivacyLedger.from_dict"):
            PrivacyLedger.from_dict({"phases": bad})
    with pytest.raises(ValueError, match="mechanism"):
        PrivacyLedger().step(1.0, 0.5, mechanism="laplace")
    assert repr(Phase(1.1, 0.01, 2)) == "Phase(noise_multiplier=1.1, sampling_rate=0.01, steps=2)"
    assert "DISCRETE_GAUSSIAN" in repr(Phase(1.1, 0.01, 2, DG))


def test_checkpoint_without_the_mechanism_field_loads_and_a_secure_run_is_re_marked(tmp_path):
    state = _secure_steps(1.3, 0.5, 4)
    opt_state = (state, ())
    plain = to_plain(opt_state)
    # what a checkpoint written before this change holds: Phase without its `mechanism` field
    for phase in plain[0][_TAG_FIELDS]["ledger"][_TAG_FIELDS]["phases"]:
        del phase[_TAG_FIELDS]["mechanism"]
    old = from_plain(plain)
    assert privacy_ledger(old).phases == (Phase(1.3, 0.5, 4),)  # read as Gaussian: the under-report
    fixed = with_discrete_gaussian_ledger(old)
    assert privacy_ledger(fixed) == state.ledger
    assert epsilon(privacy_ledger(fixed), 1e-5) == pytest.approx(discrete_gaussian_epsilon(1.3, 0.5, 4, 1e-5), rel=1e-12)
    assert with_discrete_gaussian_ledger(fixed) == fixed  # idempotent on new states
    # and the new format round-trips through a real checkpoint file
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"opt_state": opt_state})
    assert privacy_ledger(load_checkpoint(path)["opt_state"]) == state.ledger


def test_train_reads_an_old_secure_checkpoint_with_the_discrete_bound(tmp_path):
    from dpfunc.train import _load_run_checkpoint

    state = _secure_steps(1.3, 0.5, 4)
    plain_ckpt = {"config": {"secure_noise": True}, "opt_state": (state,)}
    save_checkpoint(tmp_path / "checkpoint.pt", plain_ckpt)
    loaded = _load_run_checkpoint(tmp_path / "checkpoint.pt")
    assert privacy_ledger(loaded["opt_state"]).phases[0].mechanism is DG
    # a non-secure run's ledger is left as it is
    gauss = dp_aggregate(DPConfig(1.0, 1.3, 0.5, 8), Key(0)).init({"w": torch.zeros(1)})
    gauss = gauss._replace(ledger=gauss.ledger.step(1.3, 0.5, 4))
    save_checkpoint(tmp_path / "g.pt", {"config": {"secure_noise": False}, "opt_state": (gauss,)})
    assert privacy_ledger(_load_run_checkpoint(tmp_path / "g.pt")["opt_state"]).phases == (Phase(1.3, 0.5, 4),)


def test_budget_guard_of_a_secure_transform_stops_at_the_discrete_bound():
    sigma, q, eps_budget = 2.0, 0.1, 2.0
    budget = PrivacyBudget(eps_budget, 1e-5)
    dg_steps = budget.remaining_steps(PrivacyLedger(), sigma, q, mechanism=DG)
    gauss_steps = budget.remaining_steps(PrivacyLedger(), sigma, q)
    assert 0 < dg_steps < gauss_steps  # the discrete bound is the larger ε: fewer steps fit
    assert discrete_gaussian_epsilon(sigma, q, dg_steps, 1e-5) <= eps_budget < discrete_gaussian_epsilon(sigma, q, dg_steps + 1, 1e-5)
    state = _secure_steps(sigma, q, dg_steps, budget=budget)
    assert state.ledger.total_steps == dg_steps
    tx = dp_aggregate(DPConfig(1.0, sigma, q, 8), Key(0), budget=budget, secure=True)
    with pytest.raises(PrivacyBudgetExceededError):
        tx.update(clip_and_sum({"w": torch.ones(2, 2)}, FlatClipping(1.0)), state)


_TAG_FIELDS = "fields"


def test_make_private_secure_records_discrete_gaussian_calibrates_with_its_bound_and_is_not_reproducible():
    pytest.importorskip("cryptography")
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dpfunc.bridge import make_private

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)

    def run(**kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        model, opt, loader = make_private(net, torch.optim.SGD(net.parameters(), lr=0.1),
                                          DataLoader(TensorDataset(X, Y), batch_size=8), key=Key(3), max_grad_norm=1.0, **kw)
        for i, (x, y) in enumerate(loader):
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if i == 2:
                break
        return opt, torch.cat([p.detach().flatten() for p in net.parameters()])

    opt_a, w_a = run(noise_multiplier=1.2, secure=True)
    opt_b, w_b = run(noise_multiplier=1.2, secure=True)
    assert not torch.equal(w_a, w_b)  # same key, fresh OS entropy: different noise
    assert opt_a.ledger.phases == (Phase(1.2, 1 / 8, 3, DG),)
    assert opt_a.epsilon(1e-5) == pytest.approx(discrete_gaussian_epsilon(1.2, 1 / 8, 3, 1e-5), rel=1e-12)
    assert opt_a.state_dict()["config"]["secure"] is True
    _, w_c = run(noise_multiplier=1.2)
    _, w_d = run(noise_multiplier=1.2)
    assert torch.equal(w_c, w_d)  # the default path stays bit-reproducible from the key
    opt_t, _ = run(target_epsilon=3.0, target_delta=1e-5, epochs=2, secure=True)
    planned = PrivacyLedger().step(opt_t.config.noise_multiplier, 1 / 8, 16, mechanism=DG)
    assert 0.97 * 3.0 <= epsilon(planned, 1e-5) <= 3.0
    with pytest.raises(ValueError, match="accountant"):
        run(noise_multiplier=1.2, secure=True, accountant="pld")
