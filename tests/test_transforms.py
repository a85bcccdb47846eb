"""Gradient transformations: step-for-step equality with ``torch.optim``, composition, purity."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfunc import (
    adam,
    adamw,
    add_decayed_weights,
    apply_updates,
    chain,
    clip_by_global_norm,
    identity,
    scale,
    scale_by_learning_rate,
    sgd,
    trace,
)

seeds = st.integers(0, 2**32 - 1)
STEPS = 5
SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def _params(gen):
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}


def _grads(gen):
    return [{k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()} for _ in range(STEPS)]


def _run_ours(tx, params, grads):
    state = tx.init(params)
    out = []
    for g in grads:
        before = ({k: v.clone() for k, v in g.items()}, {k: v.clone() for k, v in params.items()})
        updates, state = tx.update(g, state, params)
        assert all(torch.equal(g[k], before[0][k]) and torch.equal(params[k], before[1][k]) for k in g)  # pure
        params = apply_updates(params, updates)
        out.append(params)
    return out


def _run_torch(opt_cls, kwargs, params, grads):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = opt_cls(list(leaves.values()), **kwargs)
    out = []
    for g in grads:
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
        out.append({k: p.detach().clone() for k, p in leaves.items()})
    return out


def _assert_trajectories_equal(ours, theirs):
    for t, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-14, msg=lambda m: f"step {t}, {k}: {m}")


SGD_CONFIGS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.8, "dampening": 0.3},
    {"momentum": 0.9, "weight_decay": 0.01},
    {"weight_decay": 0.1},
    {"momentum": 0.5, "nesterov": True, "weight_decay": 0.05},
]


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
@given(seed=seeds, lr=st.floats(1e-3, 1.0))
def test_sgd_matches_torch_optim(config, seed, lr):
    gen = torch.Generator().manual_seed(seed)
    params, grads = _params(gen), _grads(gen)
    ours = _run_ours(sgd(lr, **config), params, grads)
    theirs = _run_torch(torch.optim.SGD, {"lr": lr, **config}, params, grads)
    _assert_trajectories_equal(ours, theirs)


@given(seed=seeds, lr=st.floats(1e-4, 0.5), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999), eps=st.sampled_from([1e-8, 1e-3]))
def test_adam_matches_torch_optim(seed, lr, b1, b2, eps):
    gen = torch.Generator().manual_seed(seed)
    params, grads = _params(gen), _grads(gen)
    ours = _run_ours(adam(lr, b1, b2, eps), params, grads)
    theirs = _run_torch(torch.optim.Adam, {"lr": lr, "betas": (b1, b2), "eps": eps}, params, grads)
    _assert_trajectories_equal(ours, theirs)


@given(seed=seeds, lr=st.floats(1e-4, 0.5), wd=st.sampled_from([0.0, 1e-2, 0.3]))
def test_adamw_matches_torch_optim(seed, lr, wd):
    gen = torch.Generator().manual_seed(seed)
    params, grads = _params(gen), _grads(gen)
    ours = _run_ours(adamw(lr, weight_decay=wd), params, grads)
    theirs = _run_torch(torch.optim.AdamW, {"lr": lr, "weight_decay": wd}, params, grads)
    _assert_trajectories_equal(ours, theirs)


def test_adam_and_adamw_differ_with_weight_decay():
    gen = torch.Generator().manual_seed(0)
    params, grads = _params(gen), _grads(gen)
    a = _run_ours(adam(0.1), params, grads)[-1]
    w = _run_ours(adamw(0.1, weight_decay=0.5), params, grads)[-1]
    assert not torch.allclose(a["w"], w["w"])


@given(seed=seeds, wd=st.floats(0.01, 1.0), f=st.floats(0.5, 3.0))
def test_chain_applies_left_to_right(seed, wd, f):
    gen = torch.Generator().manual_seed(seed)
    params, g = _params(gen), _grads(gen)[0]
    a, _ = chain(scale(f), add_decayed_weights(wd)).update(g, chain(scale(f), add_decayed_weights(wd)).init(params), params)
    tx_b = chain(add_decayed_weights(wd), scale(f))
    b, _ = tx_b.update(g, tx_b.init(params), params)
    for k in g:
        torch.testing.assert_close(a[k], f * g[k] + wd * params[k], rtol=1e-14, atol=0)
        torch.testing.assert_close(b[k], f * (g[k] + wd * params[k]), rtol=1e-14, atol=0)


@given(seed=seeds, max_norm=st.floats(0.01, 10.0), scale_=st.sampled_from([1e-3, 1.0, 1e3]))
def test_clip_by_global_norm(seed, max_norm, scale_):
    gen = torch.Generator().manual_seed(seed)
    g = {k: v * scale_ for k, v in _grads(gen)[0].items()}
    tx = clip_by_global_norm(max_norm)
    out, _ = tx.update(g, tx.init(g))
    norm_in = math.sqrt(sum(float(v.pow(2).sum()) for v in g.values()))
    norm_out = math.sqrt(sum(float(v.pow(2).sum()) for v in out.values()))
    if norm_in <= max_norm:
        assert all(torch.equal(out[k], g[k]) for k in g)
    else:
        assert norm_out == pytest.approx(max_norm, rel=1e-12)
        f = max_norm / norm_in
        for k in g:  # same direction
            torch.testing.assert_close(out[k], g[k] * f, rtol=1e-12, atol=1e-300)


def test_schedule_is_called_with_the_step_count():
    calls = []

    def lr(t):
        calls.append(t)
        return 1.0 / (t + 1)

    tx = sgd(lr)
    g = {"w": torch.ones(2, dtype=torch.float64)}
    state = tx.init(g)
    for t in range(4):
        u, state = tx.update(g, state, g)
        torch.testing.assert_close(u["w"], torch.full((2,), -1.0 / (t + 1), dtype=torch.float64), rtol=0, atol=0)
    assert calls == [0, 1, 2, 3]


@given(seed=seeds)
def test_schedule_matches_torch_lambda_lr(seed):
    gen = torch.Generator().manual_seed(seed)
    params, grads = _params(gen), _grads(gen)
    base = 0.3

    def sched(t):
        return base * 0.5**t

    ours = _run_ours(sgd(sched, momentum=0.9), params, grads)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=base, momentum=0.9)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    theirs = []
    for g in grads:
        for k, p in leaves.items():
            p.grad = g[k].clone()
        opt.step()
        lr_sched.step()
        theirs.append({k: p.detach().clone() for k, p in leaves.items()})
    _assert_trajectories_equal(ours, theirs)


def test_scale_by_learning_rate_sign():
    g = {"w": torch.tensor([2.0])}
    u, _ = scale_by_learning_rate(0.5).update(g, scale_by_learning_rate(0.5).init(g))
    v, _ = scale_by_learning_rate(0.5, flip_sign=False).update(g, scale_by_learning_rate(0.5).init(g))
    assert float(u["w"]) == -1.0 and float(v["w"]) == 1.0


def test_identity_and_apply_updates():
    p = {"w": torch.ones(2, dtype=torch.float32)}
    u, s = identity().update({"w": torch.full((2,), 0.5, dtype=torch.float64)}, identity().init(p))
    new = apply_updates(p, u)
    assert new["w"].dtype == torch.float32 and torch.equal(new["w"], torch.full((2,), 1.5))
    assert torch.equal(p["w"], torch.ones(2))  # not mutated
    assert new["w"] is not p["w"]


def test_apply_updates_key_mismatch():
    with pytest.raises(ValueError, match=r"apply_updates: .*\['b'\]"):
        apply_updates({"w": torch.ones(1)}, {"w": torch.ones(1), "b": torch.ones(1)})


def test_add_decayed_weights_needs_params():
    tx = add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="add_decayed_weights"):
        tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))


def test_trace_state_is_not_aliased_with_inputs():
    tx = trace(0.9)
    g = {"w": torch.ones(3)}
    u, s = tx.update(g, tx.init(g))
    assert s.trace["w"] is not g["w"] and int(s.count) == 1
    u2, s2 = tx.update(g, s)
    torch.testing.assert_close(u2["w"], torch.full((3,), 1.9))
    torch.testing.assert_close(s.trace["w"], torch.ones(3))  # old state untouched


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: sgd(-0.1), "learning_rate"),
        (lambda: sgd(math.nan), "learning_rate"),
        (lambda: trace(-0.1), "trace: momentum"),
        (lambda: trace(1.0), "trace: momentum"),
        (lambda: trace(0.0, nesterov=True), "trace: nesterov"),
        (lambda: trace(0.9, nesterov=True, dampening=0.1), "trace: nesterov"),
        (lambda: clip_by_global_norm(0.0), "clip_by_global_norm: max_norm"),
        (lambda: add_decayed_weights(-1.0), "add_decayed_weights: weight_decay"),
        (lambda: scale(math.nan), "scale: factor"),
        (lambda: adam(0.1, eps=-1.0), "scale_by_adam: eps"),
        (lambda: adam(0.1, b1=1.0), "scale_by_adam: b1"),
        (lambda: adamw(0.1, b2=1.5), "scale_by_adam: b2"),
        (lambda: adam(0.1, b1=-0.1), "scale_by_adam: b1"),
    ],
)
def test_argument_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_chain_errors():
    with pytest.raises(TypeError, match="chain: argument 1"):
        chain(identity(), 3)
    tx = chain(identity(), identity())
    with pytest.raises(ValueError, match="chain: state"):
        tx.update({"w": torch.ones(1)}, (tx.init({})[0],))


# ---- bit-identity of the multi-tensor (torch._foreach_*) paths with the per-leaf forms ---------------


def _per_leaf_sgd_updates(grads_seq, params, lr, momentum, nesterov, dampening, weight_decay):
    """The per-leaf code before the foreach change (add_decayed_weights → trace → scale_by_lr → apply)."""
    buf, out = None, []
    p = dict(params)
    for g in grads_seq:
        if weight_decay:
            g = {k: v + weight_decay * p[k] for k, v in g.items()}
        if momentum or nesterov:
            buf = {k: v.clone() for k, v in g.items()} if buf is None else {k: momentum * buf[k] + (1 - dampening) * v for k, v in g.items()}
            g = {k: v + momentum * buf[k] for k, v in g.items()} if nesterov else buf
        g = {k: v * -lr for k, v in g.items()}
        p = {k: (v + g[k]).to(v.dtype) for k, v in p.items()}
        out.append(p)
    return out


@given(seed=seeds, lr=st.floats(1e-3, 1.0), momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(),
       dampening=st.sampled_from([0.0, 0.1]), weight_decay=st.sampled_from([0.0, 1e-2]),
       n=st.integers(0, 5))
def test_sgd_chain_is_bit_identical_to_the_per_leaf_form(seed, lr, momentum, nesterov, dampening, weight_decay, n):
    if nesterov and (momentum == 0 or dampening != 0):
        nesterov = False
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):  # every dtype each example
        _check_sgd_chain(seed, lr, momentum, nesterov, dampening, weight_decay, dtype, max(n, 1) if dtype != torch.float32 else n)


def _check_sgd_chain(seed, lr, momentum, nesterov, dampening, weight_decay, dtype, n):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), (), (2, 1, 5), (11,)][:n]
    params = {f"p{i}": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shapes)}
    grads_seq = [{k: torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()} for _ in range(STEPS)]
    tx = sgd(lr, momentum, nesterov=nesterov, dampening=dampening, weight_decay=weight_decay)
    p, state = dict(params), tx.init(params)
    ref = _per_leaf_sgd_updates(grads_seq, params, lr, momentum, nesterov, dampening, weight_decay)
    for t, grads in enumerate(grads_seq):
        u, state = tx.update(grads, state, p)
        p = apply_updates(p, u)
        for k in params:
            assert torch.equal(p[k], ref[t][k]), (t, k)
    assert {k: v * 2.5 for k, v in params.items()}.keys() == scale(2.5).update(params, ())[0].keys()
    for k, v in scale(2.5).update(params, ())[0].items():
        assert torch.equal(v, params[k] * 2.5)


def test_apply_updates_mixed_dtypes_keeps_the_params_dtype():
    params = {"a": torch.ones(3, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float64)}
    updates = {"a": torch.full((3,), 0.1, dtype=torch.float64), "b": torch.full((2,), 0.1, dtype=torch.float64)}
    out = apply_updates(params, updates)
    assert out["a"].dtype == torch.float32 and torch.equal(out["a"], (params["a"] + updates["a"]).to(torch.float32))
    assert torch.equal(out["b"], params["b"] + updates["b"])
