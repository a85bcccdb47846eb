"""functionalize: tied, frozen, buffers, train/eval; keyed_global_rng."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _bridge_models import build
from dpfunc import Key, per_example_grads
from dpfunc.bridge import functionalize, keyed_global_rng, split_state


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied
        self.head = nn.Linear(4, 2)
        self.head.bias.requires_grad_(False)  # frozen
        self.drop = nn.Dropout(0.5)
        self.register_buffer("shift", torch.full((4,), 0.25))

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.b(torch.tanh(self.a(x) + self.shift)))))


def test_functionalize_splits_tied_frozen_and_buffers_and_matches_the_module():
    net = build(_Net, 0)
    apply_fn, params, consts = functionalize(net)
    assert sorted(params) == ["a.bias", "a.weight", "b.bias", "head.weight"]  # tied once, frozen out
    assert sorted(consts) == ["head.bias", "shift"]
    assert params["a.weight"].data_ptr() != net.a.weight.data_ptr()  # fresh copies: the module is never trained through them
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    net.eval()
    assert torch.equal(apply_fn(params, consts, x), net(x))
    # the tied weight's per-example gradient is the sum over both uses (oracle: autograd on the module)
    y = torch.tensor([0, 1, 1])
    pe = per_example_grads(lambda p, b, xi, yi: F.cross_entropy(apply_fn(p, b, xi[None]), yi[None]), params, consts, x, y, in_dims=(None, 0, 0))
    for i in range(3):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        torch.testing.assert_close(pe["a.weight"][i], net.a.weight.grad)
        assert net.head.bias.grad is None
    live, _ = split_state(net, clone=False)
    assert live["a.weight"].data_ptr() == net.a.weight.data_ptr()


def test_training_flag_is_forced_per_call_and_restored():
    net = build(_Net, 1).train()
    net.head.eval()  # mixed flags survive the call
    apply_eval, params, consts = functionalize(net, training=False)
    x = torch.ones(64, 4)
    out1, out2 = apply_eval(params, consts, x), apply_eval(params, consts, x)
    assert torch.equal(out1, out2)  # eval: dropout off
    assert net.training and net.drop.training and not net.head.training
    apply_train, _, _ = functionalize(net, training=True)
    with keyed_global_rng(Key(0)):
        a = apply_train(params, consts, x)
    with keyed_global_rng(Key(0)):
        b = apply_train(params, consts, x)
    assert torch.equal(a, b) and not torch.equal(a, out1)
    with pytest.raises(TypeError, match="training must be None, True or False"):
        functionalize(net, training="eval")


def test_keyed_global_rng_restores_the_callers_stream():
    before = torch.get_rng_state()
    with keyed_global_rng(Key(0)):
        a = torch.rand(4)
    with keyed_global_rng(Key(1)):
        b = torch.rand(4)
    with keyed_global_rng(Key(0)):
        c = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, c) and not torch.equal(a, b)
    with pytest.raises(TypeError, match="dpfunc.Key"):
        with keyed_global_rng(0):
            pass
