"""The nn.Module → MPC compiler (dpfunc.bridge.mpc) and the three-process parties over gloo."""

import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpfunc.bridge.mpc import MPCCompileError, OpKind, compile_module, encode_weights, encrypted_inference
from dpfunc.keys import Key
from dpfunc.models import SmallCNN, TemperedSigmoid, resnet18_gn
from dpfunc.mpc import decode, encode, simulate


def _encrypted(model, x, seed=0):
    program = compile_module(model)
    weights, image = encode_weights(model, program), encode(x)

    def party(ctx):
        return encrypted_inference(ctx, program, tuple(x.shape), key=Key(seed).fold_in(ctx.rank),
                                   image=image if ctx.rank == 1 else None,
                                   weights=weights if ctx.rank == 0 else None)

    res = simulate(party, dealer_key=Key(seed).fold_in(7))
    assert res.outputs[0] is None  # the model owner learns nothing
    return res.outputs[1], res


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU, lambda: TemperedSigmoid(2.0, 2.0, 1.0)],
                         ids=["tanh", "relu", "tempered-sigmoid"])
def test_small_cnn_encrypted_equals_plaintext(activation):
    model = SmallCNN(key=Key(3), widths=(4, 8), groups=2, activation=activation).eval()
    x = torch.rand(3, 1, 12, 12, generator=Key(4).generator())
    out, res = _encrypted(model, x)
    with torch.no_grad():
        ref = model(x).double()
    assert (decode(out.logits) - ref).abs().max() < 2e-3
    assert torch.equal(out.onehot.argmax(-1), ref.argmax(-1))
    assert torch.equal(out.onehot.sum(-1), torch.ones(3, dtype=torch.int64))
    assert res.stats[0].rounds == res.stats[1].rounds > 0


def test_resnet18_gn_encrypted_equals_plaintext():
    # a narrow ResNet-18-GN with the max-pool stem (input > 32 pixels): ReLU, max-pool, residual adds
    model = resnet18_gn(key=Key(5), input_size=36, width=4, groups=2).eval()
    ops = compile_module(model).ops
    assert {OpKind.MAX_POOL2D, OpKind.ADD, OpKind.RELU, OpKind.GROUP_NORM} <= {op.kind for op in ops}
    x = torch.rand(1, 1, 36, 36, generator=Key(6).generator())
    out, _ = _encrypted(model, x)
    with torch.no_grad():
        ref = model(x).double()
    assert (decode(out.logits) - ref).abs().max() < 5e-3
    assert torch.equal(out.onehot.argmax(-1), ref.argmax(-1))


class _Gelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        return F.gelu(self.body(x))


def test_unsupported_ops_are_refused_with_op_and_path():
    with pytest.raises(MPCCompileError, match=r"unsupported op gelu"):
        compile_module(_Gelu())
    with pytest.raises(MPCCompileError, match=r"unsupported op LSTM at module path 'rnn'"):
        compile_module(_WithLSTM())
    with pytest.raises(MPCCompileError, match="buffers"):
        compile_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    with pytest.raises(MPCCompileError, match=r"AvgPool2d\(kernel_size=3, stride=1"):
        compile_module(nn.Sequential(nn.AvgPool2d(3, stride=1)))
    with pytest.raises(TypeError, match="compile_module: module must be an nn.Module"):
        compile_module("cnn")


class _WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 4)

    def forward(self, x):
        return self.rnn(x)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("link", ["tcp", "gloo"])
def test_three_processes_over_gloo_match_plaintext(tmp_path, link):
    """Gloo rendezvous and dealer stream; the parties' per-round link over TCP (default) or gloo."""
    from dpfunc.mpc.parties import launch_parties

    model = SmallCNN(key=Key(8), widths=(4, 8), groups=2).eval()
    x = torch.rand(3, 1, 8, 8, generator=Key(9).generator())
    torch.save(model.state_dict(), tmp_path / "w.pt")
    torch.save(x, tmp_path / "x.pt")
    spec = {"model": "cnn", "model_kwargs": {"widths": [4, 8], "groups": 2}, "input_shape": [2, 1, 8, 8], "batches": 2,
            "party_link": link}
    out = launch_parties(spec=spec, weights_path=str(tmp_path / "w.pt"), images_path=str(tmp_path / "x.pt"),
                         out_path=str(tmp_path / "out.pt"), port=_free_port(), timeout=120)
    with torch.no_grad():
        ref = model(x).double()
    assert (decode(out["logits"][:3]) - ref).abs().max() < 2e-3
    assert torch.equal(out["onehot"][:3].argmax(-1), ref.argmax(-1))
    assert out["stats"]["rounds"] > 0 and out["offline_bytes_received"] > 0
    assert not (tmp_path / "out.spec.json").exists()
