"""dpfunc.bridge.functionalize: Module -> (apply_fn, params, buffers), never mutating the module."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpfunc import Key, apply_updates, dpsgd, make_step, per_example_grads
from dpfunc.bridge import functionalize

seeds = st.integers(0, 2**32 - 1)


def _net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.LayerNorm(8), nn.Linear(8, 3)
    ).double()


def _reinit(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


@settings(max_examples=10)  # expensive; fewer examples keep the suite fast
@given(seed=seeds, b=st.integers(1, 4))
def test_outputs_equal_the_module(seed, b):
    gen = torch.Generator().manual_seed(seed)
    module = _net()
    _reinit(module, gen)
    apply_fn, params, buffers = functionalize(module)
    x = torch.randn(b, 1, 6, 6, generator=gen, dtype=torch.float64)
    assert torch.equal(apply_fn(params, buffers, x), module(x))
    assert list(params) == [k for k, _ in module.named_parameters()]
    # different params -> different outputs: apply_fn really uses the dict, not the module's tensors
    other = {k: v + 0.1 for k, v in params.items()}
    assert not torch.allclose(apply_fn(other, buffers, x), module(x))


def test_buffers_are_returned_and_used():
    module = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double().eval()
    with torch.no_grad():
        module[1].running_mean.fill_(0.5)
        module[1].running_var.fill_(2.0)
    apply_fn, params, buffers = functionalize(module)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(buffers)
    assert not set(buffers) & set(params)
    assert torch.equal(buffers["1.running_mean"], torch.full((3,), 0.5, dtype=torch.float64))
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(apply_fn(params, buffers, x), module(x))
    shifted = dict(buffers, **{"1.running_mean": buffers["1.running_mean"] + 1})
    assert not torch.allclose(apply_fn(params, shifted, x), module(x))


def test_returned_tensors_are_copies():
    module = nn.Linear(3, 2)
    apply_fn, params, buffers = functionalize(module)
    for k, p in module.named_parameters():
        assert params[k].data_ptr() != p.data_ptr()
        assert not params[k].requires_grad
        assert torch.equal(params[k], p.detach())


@settings(max_examples=5)  # expensive; fewer examples keep the suite fast
@given(seed=seeds)
def test_training_the_params_leaves_the_module_untouched(seed):
    gen = torch.Generator().manual_seed(seed)
    module = _net()
    _reinit(module, gen)
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    apply_fn, params, buffers = functionalize(module)

    def loss_fn(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x.unsqueeze(0)), y.unsqueeze(0))

    tx = dpsgd(0.5, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=8, key=Key(seed))
    step = make_step(loss_fn, tx)
    state = tx.init(params)
    new = params
    for _ in range(2):
        x, y = torch.randn(4, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)
        new, state, _ = step(new, state, (x, y), buffers=buffers)
    assert any(not torch.equal(new[k], params[k]) for k in params)  # training did something
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in module.parameters())
    # and a manual update of the returned dict does not write through either
    apply_updates(params, {k: torch.ones_like(v) for k, v in params.items()})
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k])


def test_per_example_grads_through_functionalize_have_param_keys():
    module = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    apply_fn, params, buffers = functionalize(module)

    def loss_fn(p, b, x, y):
        return F.cross_entropy(apply_fn(p, b, x.unsqueeze(0)), y.unsqueeze(0))

    g = per_example_grads(loss_fn, params, buffers, torch.tensor([[1, 2], [3, 3], [6, 0]]), torch.tensor([0, 1, 1]), in_dims=(None, 0, 0))
    assert {k: tuple(v.shape) for k, v in g.items()} == {"0.weight": (3, 7, 3), "2.weight": (3, 2, 6), "2.bias": (3, 2)}
    # rows of the embedding that no example used get zero gradient
    assert torch.equal(g["0.weight"][0, 4], torch.zeros(3, dtype=torch.float64))


def test_tied_weights_appear_once_and_gradients_add_up():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx):
            return self.out(self.emb(idx))

    module = Tied().double()
    apply_fn, params, buffers = functionalize(module)
    assert list(params) == ["emb.weight"]
    idx = torch.tensor([1, 3])
    assert torch.equal(apply_fn(params, buffers, idx), module(idx))
    leaves = {"emb.weight": params["emb.weight"].clone().requires_grad_(True)}
    (g,) = torch.autograd.grad(apply_fn(leaves, buffers, idx).sum(), [leaves["emb.weight"]])
    (want,) = torch.autograd.grad(module(idx).sum(), [module.emb.weight])
    torch.testing.assert_close(g, want)


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="functionalize: module"):
        functionalize(lambda x: x)
