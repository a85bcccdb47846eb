"""Models: shapes, sizes, no BatchNorm, keyed init, per-example independence under vmap."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpfunc.keys import Key
from dpfunc.models import MODELS, ResNetGN, SmallCNN, TemperedSigmoid, build_model, resnet18_gn

# Layers the fast ghost-norm clipping path supports; every parameter must live in one of them.
GHOST_SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


@pytest.fixture(scope="module")
def cnn():
    return SmallCNN(key=Key(0)).eval()


@pytest.fixture(scope="module")
def resnet28():
    return resnet18_gn(key=Key(0), input_size=28).eval()


@pytest.fixture(scope="module")
def resnet64():
    return resnet18_gn(key=Key(0), input_size=64).eval()


def _x(seed, b, size, c=1):
    return torch.randn(b, c, size, size, generator=Key(seed).generator())


def _count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", [28, 64])
def test_output_shapes(cnn, resnet28, resnet64, size):
    assert cnn(_x(0, 3, size)).shape == (3, 2)
    resnet = resnet28 if size == 28 else resnet64
    assert resnet(_x(0, 2, size)).shape == (2, 2)
    assert SmallCNN(3, 5, key=Key(1))(_x(0, 2, size, c=3)).shape == (2, 5)


def test_stems_and_spatial_size_before_pooling(resnet28, resnet64):
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet28.stem)
    assert isinstance(resnet64.stem[-1], nn.MaxPool2d)
    assert resnet28.stem[0].kernel_size == (3, 3) and resnet28.stem[0].stride == (1, 1)
    for model, size in [(resnet28, 28), (resnet64, 64)]:
        assert model.stages(model.stem(_x(0, 1, size))).shape == (1, 512, 4, 4)


def test_parameter_counts(cnn, resnet28, resnet64):
    assert _count(cnn) == 23_650 and 20_000 <= _count(cnn) <= 60_000
    # ResNet-18 proper (ImageNet, 1000 classes) has 11.69M; 1 input channel, 3×3 stem, 2 classes
    assert _count(resnet28) == _count(resnet64) == 11_168_706
    assert _count(resnet18_gn(key=Key(0), width=16, groups=8)) < 1_000_000


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_batchnorm_no_buffers_no_inplace_and_only_ghost_supported_params(name):
    model = build_model(name, key=Key(0))
    for module in model.modules():
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm)
        assert not getattr(module, "inplace", False), f"in-place op {module}"
        if list(module.parameters(recurse=False)):
            assert isinstance(module, GHOST_SUPPORTED), f"unsupported parametrised layer {module}"
    assert list(model.buffers()) == []
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("which, size", [("cnn", 28), ("cnn", 64), ("resnet", 28), ("resnet", 64)])
def test_vmap_over_single_examples_equals_batched_forward(cnn, which, size):
    # a narrow ResNet-18 (width 16) has every layer and code path of the full one, 1/16 the cost
    model = (
        cnn
        if which == "cnn"
        else resnet18_gn(key=Key(0), input_size=size, width=16, groups=8).eval()
    )
    x = _x(1, 2, size)
    with torch.no_grad():
        batched = model(x)
        single = torch.func.vmap(lambda xi: model(xi.unsqueeze(0)).squeeze(0))(x)
    assert torch.allclose(batched, single, atol=1e-5)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32), j=st.integers(0, 3))
def test_changing_example_j_changes_only_output_j(cnn, seed, j):
    x = _x(seed, 4, 28)
    x2 = x.clone()
    x2[j] = _x(seed + 1, 1, 28)[0]
    with torch.no_grad():
        y, y2 = cnn(x), cnn(x2)
    others = [i for i in range(4) if i != j]
    assert torch.allclose(y[others], y2[others], atol=1e-6)
    assert not torch.allclose(y[j], y2[j])


def test_resnet_example_independence():
    resnet = resnet18_gn(key=Key(0), width=16, groups=8)
    x = _x(3, 3, 28)
    x2 = x.clone()
    x2[1] = 0.0
    with torch.no_grad():
        y, y2 = resnet(x), resnet(x2)
    assert torch.allclose(y[[0, 2]], y2[[0, 2]], atol=1e-5) and not torch.allclose(y[1], y2[1])


def test_per_example_grads_via_vmap_match_a_loop(cnn):
    params = {k: v.detach() for k, v in cnn.named_parameters()}
    x, y = _x(4, 3, 28), torch.tensor([0, 1, 1])

    def loss(p, xi, yi):
        logits = torch.func.functional_call(cnn, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        cnn.zero_grad()
        nn.functional.cross_entropy(cnn(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in cnn.named_parameters():
            assert torch.allclose(per_example[name][i], p.grad, atol=1e-6), name
    cnn.zero_grad(set_to_none=True)


def test_keyed_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (build_model("cnn", key=Key(s)) for s in (7, 7, 8))
    r1, r2 = (
        resnet18_gn(key=Key(0), width=16, groups=8),
        resnet18_gn(key=Key(0), width=16, groups=8),
    )
    assert torch.equal(state, torch.get_rng_state())
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.features[0].weight, c.features[0].weight)
    assert all(torch.equal(p, q) for p, q in zip(r1.parameters(), r2.parameters()))
    # kaiming fan-out for ResNet convs: std ≈ sqrt(2 / (out_channels · 9))
    w = r1.stages[1][0].conv1.weight
    assert abs(float(w.detach().std()) - (2 / (w.shape[0] * 9)) ** 0.5) < 0.01


def test_activation_is_configurable():
    relu = SmallCNN(key=Key(0), activation=nn.ReLU)
    assert any(isinstance(m, nn.ReLU) for m in relu.modules())
    tempered = SmallCNN(key=Key(0), activation=lambda: TemperedSigmoid(2, 2, 1))
    tanh = SmallCNN(key=Key(0))
    x = _x(0, 2, 28)
    assert torch.allclose(tempered(x), tanh(x), atol=1e-5)  # tempered sigmoid (2, 2, 1) is tanh
    t = torch.linspace(-3, 3, 13)
    assert torch.allclose(TemperedSigmoid(1, 1, 0)(t), torch.sigmoid(t))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="build_model: name must be one of"):
        build_model("vgg", key=Key(0))
    with pytest.raises(TypeError, match="key"):
        SmallCNN()
    with pytest.raises(TypeError, match="key must be a dpfunc.keys.Key"):
        SmallCNN(key=0)
    with pytest.raises(ValueError, match="widths"):
        SmallCNN(key=Key(0), widths=(16, 30))
    with pytest.raises(ValueError, match="groups"):
        resnet18_gn(key=Key(0), groups=48)
    with pytest.raises(TypeError, match="activation"):
        SmallCNN(key=Key(0), activation=torch.tanh)
    with pytest.raises(ValueError, match="scale"):
        TemperedSigmoid(scale=0)
    assert isinstance(build_model("resnet18", key=Key(0), width=8, groups=4), ResNetGN)
