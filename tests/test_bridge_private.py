"""make_private: an unchanged torch loop, equal to the functional core on the same keys."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _bridge_models import build
from dpfunc import DPConfig, FlatClipping, Key, dp_aggregate, dpsgd, make_step, poisson_sample, run_keys, vmap_engine
from dpfunc.bridge import PrivacyEngine, functionalize, make_private


def _data(n=32, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _train_steps(model, loader, opt, crit, steps):
    done = 0
    for x, y in loader:
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        done += 1
        if done == steps:
            break


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bridge_step_equals_functional_core_on_same_keys(reduction):
    X, Y = _data()
    net = build(_mlp, 0)
    init = functionalize(net)[1]
    key, lr, sigma, c = Key(7), 0.1, 0.8, 0.5
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    model, opt, loader = make_private(
        net, opt, DataLoader(TensorDataset(X, Y), batch_size=8), key=key, noise_multiplier=sigma, max_grad_norm=c,
        criterion=nn.CrossEntropyLoss(reduction=reduction), grad_sample_mode="vmap",
    )
    x, y = next(iter(loader))
    loss = F.cross_entropy(model(x), y, reduction=reduction)
    loss.backward()
    opt.step()
    bridge_grad = {k: p.grad.clone() for k, p in net.named_parameters()}
    bridge_params = {k: p.detach().clone() for k, p in net.named_parameters()}

    # the functional core, from the same key: the run's noise and sampling keys
    noise_key, sample_key = run_keys(key).noise, run_keys(key).sampling
    q = 1 / 4
    idx = poisson_sample(sample_key.fold_in(0), 32, q)
    assert torch.equal(x, X[idx]) and torch.equal(y, Y[idx])  # the loader draws the core's Poisson batch
    apply_fn, params, buffers = functionalize(build(_mlp, 0))
    assert all(torch.equal(params[k], init[k]) for k in init)

    def loss_fn(p, b, xi, yi):
        return F.cross_entropy(apply_fn(p, b, xi[None]), yi[None])

    cfg = DPConfig(FlatClipping(c), sigma, q, 32)
    out = vmap_engine(loss_fn, clipping=FlatClipping(c))(params, buffers, (X[idx], Y[idx]), None)
    tx = dp_aggregate(cfg, noise_key)
    core_grad, state = tx.update(out.grads, tx.init(params), params)
    tx_full = dpsgd(lr, noise_multiplier=sigma, max_grad_norm=c, sampling_rate=q, num_examples=32, key=noise_key)
    core_params, _, _ = make_step(loss_fn, tx_full)(params, tx_full.init(params), (X[idx], Y[idx]))
    assert opt.ledger == state.ledger
    if reduction == "sum":  # the output gradient is exactly the per-example loss gradient: bit for bit
        for k in core_grad:
            assert torch.equal(bridge_grad[k], core_grad[k]), k
            # torch.optim.SGD then applies it as p.add_(g, alpha=-lr) (fused; the core's sgd rounds
            # -lr·g first, so parameters agree with the core's to one rounding, exactly with torch's rule)
            assert torch.equal(bridge_params[k], init[k].add(core_grad[k], alpha=-lr)), k
            torch.testing.assert_close(bridge_params[k], core_params[k], rtol=0, atol=1e-7)
    else:  # mean: c_i = B · ∂(mean)/∂out_i, equal up to the rounding of (v / B) · B
        for k in core_grad:
            torch.testing.assert_close(bridge_grad[k], core_grad[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["vmap", "fast"])
def test_microbatches_add_noise_once_per_logical_batch(mode):
    X, Y = _data(n=48)
    results = []
    for phys in (None, 3):
        net = build(_mlp, 1)
        model, opt, loader = make_private(
            net, torch.optim.SGD(net.parameters(), lr=0.2), DataLoader(TensorDataset(X, Y), batch_size=8), key=Key(3),
            noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=phys, grad_sample_mode=mode,
        )
        sizes = []
        for x, y in loader:
            sizes.append(len(x))
            assert phys is None or len(x) <= phys
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        assert opt.steps == 6 and opt.ledger.total_steps == 6  # logical steps, not micro-batches
        results.append((sizes, {k: p.detach().clone() for k, p in net.named_parameters()}))
    (full, p_full), (micro, p_micro) = results
    assert sum(full) == sum(micro) and len(micro) > len(full)
    for k in p_full:  # the same logical batches and noise; only the summation order differs
        torch.testing.assert_close(p_micro[k], p_full[k], rtol=1e-5, atol=1e-6)


def test_empty_poisson_batch_releases_pure_noise():
    X, Y = _data(n=40)
    net = build(_mlp, 2)
    before = {k: p.detach().clone() for k, p in net.named_parameters()}
    model, opt, loader = make_private(
        net, torch.optim.SGD(net.parameters(), lr=1.0), DataLoader(TensorDataset(X, Y), batch_size=1), key=Key(11),
        noise_multiplier=2.0, max_grad_norm=1.0, grad_sample_mode="vmap",
    )
    seen_empty = False
    for x, y in loader:  # q = 1/40: most batches are empty
        out = model(x)
        if len(x) == 0:
            seen_empty = True
            assert out.shape == (0, 3)
            F.cross_entropy(out, y, reduction="sum").backward()
            opt.step()
            break
        F.cross_entropy(out, y).backward()
        opt.step()
        opt.zero_grad()
    assert seen_empty
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert any(not torch.equal(before[k], p) for k, p in net.named_parameters())  # the noise moved the model


def test_fast_engine_matches_vmap_engine():
    X, Y = _data(n=32)
    params = []
    for mode in ("vmap", "fast"):
        net = build(_mlp, 4)
        model, opt, loader = make_private(
            net, torch.optim.SGD(net.parameters(), lr=0.3), DataLoader(TensorDataset(X, Y), batch_size=8), key=Key(5),
            noise_multiplier=0.5, max_grad_norm=0.3, grad_sample_mode=mode,
        )
        _train_steps(model, loader, opt, nn.CrossEntropyLoss(), 3)
        params.append({k: p.detach().clone() for k, p in net.named_parameters()})
    for k in params[0]:
        torch.testing.assert_close(params[1][k], params[0][k], rtol=1e-5, atol=1e-6)


def test_frozen_and_tied_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.mid = nn.Linear(4, 4)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight  # tied
            self.mid.bias.requires_grad_(False)  # frozen

        def forward(self, t):
            return self.out(torch.tanh(self.mid(self.emb(t))))

    net = build(Tied, 0)
    apply_fn, params, buffers = functionalize(net)
    assert sorted(params) == ["emb.weight", "mid.weight"] and "mid.bias" in buffers
    t = torch.tensor([1, 3, 5, 0])
    y = torch.tensor([2, 3, 0, 1])
    frozen = net.mid.bias.detach().clone()
    model, opt, loader = make_private(
        net, torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5), DataLoader(TensorDataset(t, y), batch_size=2),
        key=Key(0), noise_multiplier=0.0, max_grad_norm=100.0, criterion=nn.CrossEntropyLoss(reduction="sum"), grad_sample_mode="vmap",
    )
    ref = copy.deepcopy(net)
    x, yy = next(iter(loader))
    F.cross_entropy(model(x), yy, reduction="sum").backward()
    opt.step()
    assert net.mid.bias.grad is None and torch.equal(net.mid.bias, frozen)
    assert net.out.weight is net.emb.weight  # still tied
    # oracle: the tied weight's gradient is the sum over both uses, divided by q·n (σ = 0, no clipping)
    (F.cross_entropy(ref(x), yy, reduction="sum") / (0.5 * 4)).backward()
    torch.testing.assert_close(net.emb.weight.grad, ref.emb.weight.grad)


@pytest.mark.parametrize("mode", ["vmap", "fast"])
def test_dropout_uses_keys_and_leaves_global_rng_alone(mode):
    X, Y = _data(n=32)
    runs = []
    state = torch.get_rng_state()
    for _ in range(2):
        net = build(lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)), 3)
        model, opt, loader = make_private(
            net, torch.optim.SGD(net.parameters(), lr=0.3), DataLoader(TensorDataset(X, Y), batch_size=8), key=Key(9),
            noise_multiplier=0.0, max_grad_norm=1e6, criterion=nn.CrossEntropyLoss(reduction="sum"), grad_sample_mode=mode,
        )
        x, y = next(iter(loader))
        ref = copy.deepcopy(net)
        out = model(x)
        F.cross_entropy(out, y, reduction="sum").backward()
        opt.step()
        runs.append({k: p.grad.clone() for k, p in net.named_parameters()})
        # the gradient pass replays the forward's dropout masks: it equals autograd through that very output
        from dpfunc.bridge import keyed_global_rng
        with keyed_global_rng(run_keys(Key(9)).dropout.fold_in(0)):
            ref_out = ref(x)
        assert torch.equal(ref_out, out.detach())
        (F.cross_entropy(ref_out, y, reduction="sum") / 8).backward()
        for k, p in ref.named_parameters():
            torch.testing.assert_close(runs[-1][k], p.grad)
    assert torch.equal(torch.get_rng_state(), state)  # library code never touched the global stream
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])  # same key, same masks


def test_unchanged_loop_features_and_errors():
    X, Y = _data()
    net = build(_mlp, 5)
    engine = PrivacyEngine(key=Key(1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    model, opt, loader = engine.make_private(
        module=net, optimizer=opt, data_loader=DataLoader(TensorDataset(X, Y), batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
    )
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert list(model.state_dict()) == list(net.state_dict())  # no "_module." prefix
    assert getattr(model, "0") is net[0] and model._module is net  # attributes reach the wrapped module
    with pytest.raises(RuntimeError, match="no training forward is pending"):
        opt.step()
    x, y = next(iter(loader))
    model(x)
    with pytest.raises(RuntimeError, match="loss.backward"):
        opt.step()
    _train_steps(model, loader, opt, nn.CrossEntropyLoss(), 2)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    assert engine.ledger.total_steps == 2
    import dpfunc.accounting as acc

    eps = engine.get_epsilon(1e-5)
    assert eps == acc.epsilon(opt.ledger, 1e-5) and 0 < eps < acc.epsilon(opt.ledger.step(1.0, 0.25), 1e-5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(X), net(X))  # eval: exactly the wrapped module
    other = build(_mlp, 0)
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        make_private(other, torch.optim.SGD(other.parameters(), lr=0.1), DataLoader(TensorDataset(X, Y), batch_size=8), key=Key(0), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="not a trainable parameter"):
        make_private(build(_mlp, 0), torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(TensorDataset(X, Y), batch_size=8), key=Key(0), max_grad_norm=1.0, noise_multiplier=1.0)


def test_target_epsilon_calibrates_or_says_not_implemented():
    import dpfunc.accounting as acc

    X, Y = _data(n=64)
    net = build(_mlp, 6)
    kwargs = dict(key=Key(0), target_epsilon=3.0, target_delta=1e-5, epochs=2, max_grad_norm=1.0)
    args = (net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(TensorDataset(X, Y), batch_size=8))
    if not hasattr(acc, "noise_multiplier_for"):
        with pytest.raises(NotImplementedError, match="noise_multiplier_for"):
            make_private(*args, **kwargs)
        return
    model, opt, loader = make_private(*args, **kwargs)
    sigma = opt.config.noise_multiplier
    assert sigma > 0
    ledger = opt.ledger.step(sigma, 1 / 8, 2 * 8)  # the planned run
    eps = acc.epsilon(ledger, 1e-5)
    assert eps <= 3.0 and eps >= 0.97 * 3.0


def _stack(draw):
    """A random small model: conv or MLP stacks of Linear / Conv / GroupNorm / ReLU."""
    conv = draw(st.booleans())
    layers = []
    if conv:
        ch, size = draw(st.integers(1, 3)), draw(st.integers(4, 6))
        shape = (ch, size, size)
        for _ in range(draw(st.integers(1, 2))):
            out, k = draw(st.sampled_from([2, 4])), draw(st.integers(1, 3))
            layers.append(lambda ch=ch, out=out, k=k: nn.Conv2d(ch, out, k, padding=1))
            size = size + 2 - k + 1
            ch = out
            if draw(st.booleans()):
                layers.append(lambda ch=ch: nn.GroupNorm(draw_groups(ch), ch))
            layers.append(lambda: nn.ReLU())
        layers.append(lambda: nn.Flatten())
        width = ch * size * size
    else:
        width = draw(st.integers(2, 6))
        shape = (width,)
        for _ in range(draw(st.integers(1, 3))):
            out = draw(st.sampled_from([2, 4, 6]))
            layers.append(lambda width=width, out=out: nn.Linear(width, out))
            if out >= 4 and draw(st.booleans()):
                layers.append(lambda out=out: nn.GroupNorm(2, out))
            layers.append(lambda: nn.ReLU())
            width = out
    layers.append(lambda width=width: nn.Linear(width, 3))
    return (lambda: nn.Sequential(*[f() for f in layers])), shape


def draw_groups(ch):
    return 2 if ch % 2 == 0 else 1


@settings(max_examples=12)
@given(data=st.data())
def test_bridge_per_example_gradients_equal_loop_oracle(data):
    factory, shape = _stack(data.draw)
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    n, c = 12, data.draw(st.sampled_from([0.05, 0.5, 100.0]), label="max_grad_norm")
    g = torch.Generator().manual_seed(seed)
    # float64, so that the comparison is about the gradients, not float32 rounding in small norm groups
    X, Y = torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    net = build(factory, seed).double()
    ref = copy.deepcopy(net)
    names = [k for k, _ in ref.named_parameters()]

    # the loop oracle: one autograd.grad call per example
    def oracle(i):
        loss = F.cross_entropy(ref(X[i : i + 1]), Y[i : i + 1])
        return dict(zip(names, torch.autograd.grad(loss, list(ref.parameters()))))

    oracle_grads = [oracle(i) for i in range(n)]
    # functionalize + the core's vmap per-example gradients
    apply_fn, params, buffers = functionalize(net)
    from dpfunc import per_example_grads

    pe = per_example_grads(lambda p, b, x, y: F.cross_entropy(apply_fn(p, b, x[None]), y[None]), params, buffers, X, Y, in_dims=(None, 0, 0))
    for i in range(n):
        for k in names:
            torch.testing.assert_close(pe[k][i], oracle_grads[i][k], rtol=1e-9, atol=1e-12)
    # the DP bridge (σ = 0): .grad = Σ_i clip(g_i, C) / (q n) for the batch the loader drew
    model, opt, loader = make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.0), DataLoader(TensorDataset(X, Y), batch_size=4), key=Key(seed),
        noise_multiplier=0.0, max_grad_norm=c, grad_sample_mode=data.draw(st.sampled_from(["vmap", "fast"]), label="mode"),
    )
    x, y = next(iter(loader))
    idx = [int((X == xi).flatten(1).all(1).nonzero()[0]) for xi in x]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in idx:
        norm = torch.sqrt(sum(oracle_grads[i][k].pow(2).sum() for k in names))
        f = min(1.0, c / float(norm)) if float(norm) > 0 else 1.0
        for k in names:
            expected[k] += f * oracle_grads[i][k]
    for k, p in net.named_parameters():
        torch.testing.assert_close(p.grad, expected[k] / (n / 3), rtol=1e-9, atol=1e-12)


def test_fixed_batches_warn_that_the_poisson_accounting_does_not_cover_them():
    """poisson_sampling=False keeps shuffled fixed-size batches but the ledger records Poisson sampling at
    q = 1/len(loader): make_private says so (it was silent), and the default (Poisson) does not warn."""
    import warnings

    X, Y = _data()
    kwargs = dict(key=Key(0), noise_multiplier=1.0, max_grad_norm=1.0)

    def fresh():
        net = _mlp()
        return net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)

    def warned(**extra) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_private(*fresh(), **kwargs, **extra)
        return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]

    fixed = warned(poisson_sampling=False)
    assert len(fixed) == 1 and fixed[0].startswith("make_private: poisson_sampling=False"), fixed
    assert "q = 0.25" in fixed[0] and "not covered" in fixed[0]
    assert warned() == []  # Poisson sampling (the default): nothing to warn about
