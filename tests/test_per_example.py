"""Invariant 1: per-example gradients equal a loop of single-example ``torch.autograd.grad`` calls."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dpfunc import per_example_grads, per_example_grads_and_losses
from dpfunc.bridge import functionalize

seeds = st.integers(0, 2**32 - 1)
batch_sizes = st.integers(0, 5)
chunk_sizes = st.sampled_from([None, 1, 2, 3])


class Scaled(nn.Module):
    """A layer that uses a buffer in its forward pass (buffers must be passed through, not trained)."""

    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, n))

    def forward(self, x):
        return self.lin(x) * self.scale


def _models():
    """name -> (module factory, input factory(gen, B), num classes)."""
    return {
        "linear": (lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)), lambda g, b: torch.randn(b, 4, generator=g, dtype=torch.float64), 2),
        "conv2d": (
            lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, stride=2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)),
            lambda g, b: torch.randn(b, 1, 6, 6, generator=g, dtype=torch.float64),
            3,
        ),
        "groupnorm": (
            lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)),
            lambda g, b: torch.randn(b, 2, 5, 5, generator=g, dtype=torch.float64),
            2,
        ),
        "layernorm": (
            lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)),
            lambda g, b: torch.randn(b, 5, generator=g, dtype=torch.float64),
            3,
        ),
        "embedding": (
            lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(3 * 4, 2)),
            lambda g, b: torch.randint(0, 10, (b, 3), generator=g),
            2,
        ),
        "buffer": (lambda: nn.Sequential(Scaled(4), nn.Tanh(), nn.Linear(4, 2)), lambda g, b: torch.randn(b, 4, generator=g, dtype=torch.float64), 2),
    }


MODELS = _models()


def _setup(name, seed):
    make_module, make_x, k = MODELS[name]
    torch_gen = torch.Generator().manual_seed(seed)
    module = make_module().double()
    # Re-initialise from the drawn seed (module init uses the global RNG; we overwrite it deterministically).
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen, dtype=torch.float64) * 0.5)
    apply_fn, params, buffers = functionalize(module)
    return apply_fn, params, buffers, make_x, k, torch_gen


def _loss(apply_fn):
    def loss_fn(params, buffers, x, y, class_weight):
        logits = apply_fn(params, buffers, x.unsqueeze(0))
        return F.cross_entropy(logits, y.unsqueeze(0), weight=class_weight)

    return loss_fn


def _oracle(loss_fn, params, buffers, x, y, w):
    names = list(params)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    grads = {k: [] for k in names}
    losses = []
    for i in range(x.shape[0]):
        loss = loss_fn(leaves, buffers, x[i], y[i], w)
        gs = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        for k, gk in zip(names, gs):
            grads[k].append(torch.zeros_like(leaves[k]) if gk is None else gk)
        losses.append(loss.detach())
    out = {k: torch.stack(v) if v else params[k].new_zeros((0, *params[k].shape)) for k, v in grads.items()}
    return out, (torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(MODELS))
@given(seed=seeds, b=batch_sizes, chunk_size=chunk_sizes)
def test_matches_autograd_loop(name, seed, b, chunk_size):
    apply_fn, params, buffers, make_x, k, gen = _setup(name, seed)
    x = make_x(gen, b)
    y = torch.randint(0, k, (b,), generator=gen)
    w = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5  # shared, not batched
    loss_fn = _loss(apply_fn)
    params_before = {n: v.clone() for n, v in params.items()}

    grads, losses = per_example_grads_and_losses(loss_fn, params, buffers, x, y, w, in_dims=(None, 0, 0, None), chunk_size=chunk_size)
    want, want_losses = _oracle(loss_fn, params, buffers, x, y, w)

    assert set(grads) == set(params)
    for n in params:
        assert grads[n].shape == (b, *params[n].shape)
        torch.testing.assert_close(grads[n], want[n], rtol=1e-9, atol=1e-11)
        assert torch.equal(params[n], params_before[n])  # pure
    assert losses.shape == (b,)
    torch.testing.assert_close(losses, want_losses, rtol=1e-10, atol=1e-12)


def test_buffers_reach_the_forward_pass():
    """Changing the buffer changes the gradients, so it is really used (and not trained)."""
    apply_fn, params, buffers, make_x, k, gen = _setup("buffer", 1)
    x, y, w = make_x(gen, 3), torch.tensor([0, 1, 0]), torch.ones(2, dtype=torch.float64)
    loss_fn = _loss(apply_fn)
    g1 = per_example_grads(loss_fn, params, buffers, x, y, w, in_dims=(None, 0, 0, None))
    buffers2 = {n: v * 3 for n, v in buffers.items()}
    g2 = per_example_grads(loss_fn, params, buffers2, x, y, w, in_dims=(None, 0, 0, None))
    assert set(g1) == set(params) and not any("scale" in n for n in g1)
    assert not torch.allclose(g1["0.lin.weight"], g2["0.lin.weight"])


def test_simple_closed_form():
    """Least squares: ∇_w (w·x − y)² = 2 (w·x − y) x."""
    gen = torch.Generator().manual_seed(0)
    w = {"w": torch.randn(3, generator=gen, dtype=torch.float64)}
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    g = per_example_grads(lambda p, xi, yi: (p["w"] @ xi - yi) ** 2, w, x, y)
    torch.testing.assert_close(g["w"], 2 * (x @ w["w"] - y)[:, None] * x)


def test_empty_batch_gives_empty_tensors():
    w = {"w": torch.ones(3, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    g, losses = per_example_grads_and_losses(lambda p, x: (p["w"] @ x + p["b"]) ** 2, w, torch.zeros(0, 3, dtype=torch.float64))
    assert g["w"].shape == (0, 3) and g["b"].shape == (0,)
    assert g["w"].dtype == torch.float64
    assert losses.shape == (0,)


def _sq(p, x, y):
    return ((p["w"] * x).sum() - y) ** 2


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.ones(3, 2), torch.ones(4)), {}, "batch size"),
        ((torch.ones(3, 2), torch.ones(3)), {"in_dims": (None, None)}, "at least one batched"),
        ((torch.ones(3, 2), torch.ones(3)), {"in_dims": (0,)}, "in_dims"),
        ((torch.ones(3, 2), torch.ones(3)), {"in_dims": (1, 0)}, "in_dims"),
        ((torch.ones(3, 2), torch.ones(3)), {"chunk_size": 0}, "chunk_size"),
    ],
)
def test_argument_errors_name_the_function(args, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        per_example_grads(_sq, {"w": torch.ones(2)}, *args, **kwargs)
    assert "per_example_grads" in str(info.value)
