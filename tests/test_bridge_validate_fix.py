"""validate / assert_valid / fix on ResNet-18, VGG- and U-Net-style models with BatchNorm."""

import copy

import pytest
import torch
from torch import nn

from _bridge_models import ResNet18, UNetSmall, build, vgg_small
from dpfunc import Key
from dpfunc.bridge import ModuleValidationError, Norm, Severity, assert_valid, default_num_groups, fix, make_private, validate

MODELS = {
    "resnet18": (ResNet18, (2, 3, 32, 32)),
    "vgg": (vgg_small, (2, 3, 32, 32)),
    "unet": (UNetSmall, (2, 1, 16, 16)),
}


def _count(m, cls):
    return sum(isinstance(x, cls) for x in m.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fix_then_validate_has_no_errors(name):
    factory, shape = MODELS[name]
    model = build(factory, 0)
    errors = [p for p in validate(model) if p.severity is Severity.ERROR]
    n_bn = _count(model, nn.modules.batchnorm._BatchNorm)
    n_in = sum(isinstance(x, nn.modules.instancenorm._InstanceNorm) and x.track_running_stats for x in model.modules())
    assert len(errors) == n_bn + n_in > 0
    with pytest.raises(ModuleValidationError) as info:
        assert_valid(model)
    assert len(info.value.problems) == len(errors)  # every error listed, not just the first
    assert all(p.path in str(info.value) for p in errors)

    before = copy.deepcopy(model.state_dict())
    fixed = fix(model)
    # the input is not mutated
    assert _count(model, nn.modules.batchnorm._BatchNorm) == n_bn
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _count(fixed, nn.modules.batchnorm._BatchNorm) == 0
    assert not [p for p in validate(fixed, example_input=torch.zeros(shape)) if p.severity is not Severity.INFO]
    assert_valid(fixed)
    for m in fixed.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_groups == default_num_groups(m.num_channels)
    out = fixed.eval()(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(out).all()


def test_fix_carries_affine_weights_and_group_choice():
    bn = nn.BatchNorm2d(24)
    with torch.no_grad():
        bn.weight.copy_(torch.arange(24.0))
        bn.bias.copy_(-torch.arange(24.0))
    net = fix(nn.Sequential(nn.Conv2d(3, 24, 1), bn))
    gn = net[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 8 and gn.eps == bn.eps
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    assert fix(nn.Sequential(nn.BatchNorm2d(64)))[0].num_groups == 32
    assert fix(nn.BatchNorm1d(6), norm=Norm.LAYER).num_groups == 1  # the root itself is replaced
    assert fix(nn.BatchNorm1d(6), norm=Norm.INSTANCE).num_groups == 6
    assert fix(nn.BatchNorm1d(12), num_groups=lambda c: c // 4).num_groups == 3
    with pytest.raises(ValueError, match="does not divide the 24 channels of 1"):
        fix(nn.Sequential(nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24)), num_groups=5)
    with pytest.raises(TypeError, match="Norm.GROUP"):
        fix(bn, norm="group")
    with pytest.raises(ValueError, match="only used with Norm.GROUP"):
        fix(bn, norm=Norm.LAYER, num_groups=4)


def test_shared_batchnorm_stays_shared():
    bn = nn.BatchNorm1d(4)
    net = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn)
    fixed = fix(net)
    assert fixed[1] is fixed[3] and isinstance(fixed[1], nn.GroupNorm)


def test_conversion_exact_only_where_documented():
    g = torch.Generator().manual_seed(3)
    net = build(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)), 5)
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5, generator=g)
        net[1].bias.uniform_(-0.5, 0.5, generator=g)
    x1 = torch.randn(1, 3, 9, 9, generator=g)
    exact = fix(net, norm=Norm.INSTANCE)
    # train mode, one example, G = C: BatchNorm's batch statistics ARE the per-example statistics
    torch.testing.assert_close(exact.train()(x1), copy.deepcopy(net).train()(x1), rtol=1e-5, atol=1e-6)
    # eval mode with running statistics: BatchNorm is a fixed affine map, GroupNorm is not -> different
    assert not torch.allclose(exact.eval()(x1), net.eval()(x1), atol=1e-3)
    # a model without norms is untouched: bit for bit
    plain = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 1)
    xs = torch.randn(5, 3, generator=g)
    assert torch.equal(fix(plain)(xs), plain(xs))
    # InstanceNorm without running stats: exact in train mode
    inn = nn.Sequential(nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    fixed = fix(inn)
    assert not fixed[1].track_running_stats
    xb = torch.randn(3, 3, 5, 5, generator=g)
    assert torch.equal(fixed.train()(xb), copy.deepcopy(inn).train()(xb))


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        self.seen += x.shape[0]  # a buffer written from the data
        return self.lin(x) * self.scale


def test_validate_dynamic_buffer_check_and_infos():
    m = nn.Sequential(_Counter(), nn.PReLU())
    static = validate(m)
    assert [p.severity for p in static] == [Severity.WARNING, Severity.INFO]
    assert static[1].path == "1" and "fall back to vmap" in static[1].message
    dyn = validate(m, example_input=torch.randn(4, 3))
    assert [p.severity for p in dyn] == [Severity.ERROR, Severity.INFO]
    assert dyn[0].path == "0" and "'0.seen'" in dyn[0].message
    # buffers that stay constant: the warning disappears once checked
    quiet = nn.Sequential(nn.Linear(3, 3))
    quiet.register_buffer("const", torch.ones(3))
    assert validate(quiet) and not validate(quiet, example_input=torch.randn(2, 3))
    assert assert_valid(m) == static  # warnings do not raise unless strict
    with pytest.raises(ModuleValidationError):
        assert_valid(m, strict=True)
    assert "Fix:" in str(static[0])


def test_batchnorm_model_trains_after_fix():
    g = torch.Generator().manual_seed(0)
    n = 96
    y = torch.randint(0, 2, (n,), generator=g)
    # the class is a pattern along positions (a constant offset would be normalised away by GroupNorm)
    x = torch.randn(n, 4, 6, generator=g) * 0.5
    x[:, 0] += (2 * y.float() - 1).view(-1, 1) * torch.tensor([1.0, -1.0] * 3)
    net = build(lambda: nn.Sequential(nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)), 2)
    with pytest.raises(ModuleValidationError):
        make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16), key=Key(0), noise_multiplier=0.5, max_grad_norm=1.0)
    fixed = fix(net)
    opt = torch.optim.SGD(fixed.parameters(), lr=0.5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model, opt, loader = make_private(fixed, opt, loader, key=Key(1), noise_multiplier=0.3, max_grad_norm=1.0, grad_sample_mode="vmap")
    crit = nn.CrossEntropyLoss()

    def full_loss():
        with torch.no_grad():
            return float(crit(model.eval()(x), y))

    start = full_loss()
    for _ in range(3):
        model.train()
        for xb, yb in loader:
            loss = crit(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert full_loss() < 0.3 * start
