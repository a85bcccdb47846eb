"""PneumoniaMNIST loader (folders, checksums, corrupt files, download) and keyed augmentation."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfunc.data import (
    CLASS_NAMES,
    FIXED,
    UNIT,
    ImageDataset,
    Normalization,
    _files,
    augment,
    augment_views,
    download_pneumoniamnist,
    multiplicity_loss,
    pneumoniamnist,
    resolve_data_dir,
    train_normalization,
)
from dpfunc.keys import Key

SHARED = Path(os.environ.get("DPFUNC_TEST_DATA", "/work/shared/data"))
needs_real = pytest.mark.skipif(
    not (SHARED / "pneumoniamnist.npz").is_file(), reason="shared pneumoniamnist.npz not available"
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the user's real cache, DPFUNC_DATA or the project's data folder."""
    monkeypatch.delenv("DPFUNC_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(_files, "project_data_dir", lambda: None)


def _fake_npz(path, n=6, *, drop=None, image_shape=(28, 28), labels=None, dtype=np.uint8):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *image_shape)).astype(dtype)
        arrays[f"{split}_labels"] = (
            np.asarray(labels).reshape(-1, 1)
            if labels is not None
            else (np.arange(n) % 2).reshape(n, 1)
        ).astype(np.uint8)
    if drop:
        arrays.pop(drop)
    np.savez_compressed(path, **arrays)
    return arrays


# --------------------------------------------------------------------------- real data


@needs_real
@pytest.mark.parametrize(
    "split, n, counts",
    [("train", 4708, (1214, 3494)), ("val", 524, (135, 389)), ("test", 624, (234, 390))],
)
def test_real_splits_shapes_counts_and_fixed_range(split, n, counts):
    ds = pneumoniamnist(split, SHARED)
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == n
    assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
    assert ds.classes == CLASS_NAMES == ("normal", "pneumonia")
    assert tuple(ds.class_counts().values()) == counts
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.images.min() < -0.9
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y.ndim == 0


@needs_real
def test_real_size64_upsamples_and_matches_native_on_average():
    small, big = pneumoniamnist("val", SHARED), pneumoniamnist("val", SHARED, size=64)
    assert big.images.shape == (524, 1, 64, 64)
    assert torch.equal(small.labels, big.labels)
    # bilinear upsampling preserves the image mean up to border effects
    assert torch.allclose(
        small.images.mean(dim=(1, 2, 3)), big.images.mean(dim=(1, 2, 3)), atol=0.02
    )


@needs_real
def test_real_train_normalization_reads_train_split():
    norm = train_normalization(SHARED)
    raw = np.load(SHARED / "pneumoniamnist.npz")["train_images"] / 255.0
    assert norm == Normalization(mean=float(raw.mean()), std=float(raw.std()))
    ds = pneumoniamnist("train", SHARED, normalization=norm)
    assert abs(float(ds.images.mean())) < 1e-4 and abs(float(ds.images.std()) - 1) < 1e-3


@needs_real
def test_real_works_with_dataloader_and_env_var(monkeypatch):
    monkeypatch.setenv("DPFUNC_DATA", str(SHARED))
    ds = pneumoniamnist("test")
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)
    xb, yb = ds[torch.tensor([0, 5])]  # batch indexing, as Poisson sampling uses
    assert xb.shape == (2, 1, 28, 28) and torch.equal(yb, ds.labels[[0, 5]])


# --------------------------------------------------------------------------- synthetic files


def test_fixed_and_unit_normalisation_are_exact(tmp_path):
    arrays = _fake_npz(tmp_path / "pneumoniamnist.npz")
    raw = torch.from_numpy(arrays["val_images"]).float()
    fixed = pneumoniamnist("val", tmp_path, verify_checksum=False)
    unit = pneumoniamnist("val", tmp_path, normalization=UNIT, verify_checksum=False)
    assert torch.allclose(fixed.images[:, 0], (raw / 255 - 0.5) / 0.5)
    assert torch.allclose(unit.images[:, 0], raw / 255)
    assert FIXED(torch.tensor([0, 255])).tolist() == [-1.0, 1.0]
    assert torch.equal(fixed.labels, torch.tensor([0, 1, 0, 1, 0, 1]))


def test_path_to_file_itself_is_accepted(tmp_path):
    _fake_npz(tmp_path / "anything.npz")
    assert len(pneumoniamnist("test", tmp_path / "anything.npz", verify_checksum=False)) == 6


def test_folder_resolution_order(tmp_path, monkeypatch):
    assert resolve_data_dir() == tmp_path / "xdg" / "dpfunc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == Path(os.path.expanduser("~")) / ".cache" / "dpfunc"
    monkeypatch.setenv("DPFUNC_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_missing_file_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        pneumoniamnist("train", tmp_path / "nowhere")
    msg = str(err.value)
    assert "pneumoniamnist:" in msg and str(tmp_path / "nowhere") in msg
    assert "download=True" in msg and "DPFUNC_DATA" in msg


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: _fake_npz(p, drop="val_labels"), "missing"),
        (lambda p: _fake_npz(p, image_shape=(32, 32)), "(N, 28, 28)"),
        (lambda p: _fake_npz(p, dtype=np.float32), "uint8"),
        (lambda p: _fake_npz(p, labels=[0, 1, 2, 0, 1, 0]), "0 (normal) or 1"),
        (lambda p: (_fake_npz(p), _truncate(p)), "unreadable"),
        (lambda p: p.write_bytes(b"not a zip file at all"), "unreadable"),
    ],
    ids=["missing-key", "wrong-shape", "wrong-dtype", "bad-labels", "truncated", "not-zip"],
)
def test_corrupt_files_give_clear_value_errors(tmp_path, make, fragment):
    path = tmp_path / "pneumoniamnist.npz"
    make(path)
    with pytest.raises(ValueError) as err:  # checksum first
        pneumoniamnist("val", tmp_path)
    assert "checksum mismatch" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ValueError) as err:  # then structure
        pneumoniamnist("val", tmp_path, verify_checksum=False)
    assert (
        fragment in str(err.value)
        and str(path) in str(err.value)
        and "download=True" in str(err.value)
    )


def test_checksum_is_cached_by_path_and_mtime(tmp_path, monkeypatch):
    _fake_npz(tmp_path / "pneumoniamnist.npz")
    calls = []
    real = _files._hash_stream
    monkeypatch.setattr(_files, "_hash_stream", lambda f: calls.append(1) or real(f))
    monkeypatch.setattr(
        _files, "KNOWN_SHA256", frozenset({_files.file_digests(tmp_path / "pneumoniamnist.npz")[1]})
    )
    calls.clear()
    pneumoniamnist("val", tmp_path)
    pneumoniamnist("test", tmp_path)
    assert calls == []  # digest computed above, reused
    stat = (tmp_path / "pneumoniamnist.npz").stat()
    os.utime(tmp_path / "pneumoniamnist.npz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    pneumoniamnist("val", tmp_path)
    assert calls == [1]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"split": "training"}, "split"),
        ({"size": 27}, "size"),
        ({"size": 28.0}, "size"),
        ({"normalization": "train_stats"}, "Normalization"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, fragment):
    _fake_npz(tmp_path / "pneumoniamnist.npz")
    args = {"split": "val", **kwargs}
    with pytest.raises((ValueError, TypeError), match=fragment):
        pneumoniamnist(args.pop("split"), tmp_path, verify_checksum=False, **args)


def test_normalization_validates_and_is_json_friendly():
    with pytest.raises(ValueError, match="std"):
        Normalization(0.5, 0.0)
    with pytest.raises(ValueError, match="mean"):
        Normalization(float("nan"), 1.0)
    assert json.loads(json.dumps(FIXED.__dict__)) == {"mean": 0.5, "std": 0.5}


def test_image_dataset_validates_shapes():
    with pytest.raises(ValueError, match="ImageDataset"):
        ImageDataset(torch.zeros(3, 28, 28), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- download


@needs_real
def test_download_from_file_url_verifies_and_loads(tmp_path):
    url = (SHARED / "pneumoniamnist.npz").as_uri()
    path = download_pneumoniamnist(tmp_path / "cache", url=url)
    assert path == tmp_path / "cache" / "pneumoniamnist.npz" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["pneumoniamnist.npz"]  # no temp left
    assert len(pneumoniamnist("test", tmp_path / "cache")) == 624
    # a verified file is not fetched again
    assert (
        download_pneumoniamnist(tmp_path / "cache", fetch=lambda u, f: pytest.fail("refetched"))
        == path
    )


@needs_real
def test_load_with_download_true_fills_the_cache(tmp_path, monkeypatch):
    fetched = []

    def fake_fetch(url, out):
        fetched.append(url)
        out.write((SHARED / "pneumoniamnist.npz").read_bytes())

    monkeypatch.setattr(_files, "_urlopen_copy", fake_fetch)
    ds = pneumoniamnist("val", download=True)
    assert len(ds) == 524 and fetched == [_files.PNEUMONIAMNIST_URL]
    assert (tmp_path / "xdg" / "dpfunc" / "pneumoniamnist.npz").is_file()


def test_download_of_wrong_bytes_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.npz"
    _fake_npz(bad)
    with pytest.raises(ValueError, match="neither of which is a known"):
        download_pneumoniamnist(tmp_path / "cache", url=bad.as_uri())
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_failure_names_url_and_leaves_nothing(tmp_path):
    url = (tmp_path / "does-not-exist.npz").as_uri()
    with pytest.raises(OSError, match="does-not-exist"):
        download_pneumoniamnist(tmp_path / "cache", url=url)
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_replaces_a_corrupt_file(tmp_path, monkeypatch):
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"junk")
    good = b"bytes whose digest we declare known"
    monkeypatch.setattr(
        _files, "KNOWN_SHA256", frozenset({_files._hash_stream(io.BytesIO(good))[1]})
    )
    path = download_pneumoniamnist(tmp_path, fetch=lambda url, out: out.write(good))
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pneumoniamnist.npz"]


# --------------------------------------------------------------------------- augmentation


def _images(seed, b=6, c=1, h=12, w=12):
    return torch.rand(b, c, h, w, generator=Key(seed).generator())


def test_augment_pure_deterministic_and_shape_preserving():
    x = _images(0)
    before = x.clone()
    a, b = augment(Key(1), x), augment(Key(1), x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and torch.equal(x, before)
    assert not torch.allclose(a, augment(Key(2), x))


def test_augment_identity_is_exact_copy():
    x = _images(0)
    y = augment(Key(3), x, max_shift=0, max_rotation=0)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


def _shift_oracle(img, dx, dy):
    """Content moved by (+dx, +dy) pixels, border pixels replicated (pad-with-edge + crop)."""
    h, w = img.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return img[..., rows[:, None], cols[None, :]]


@given(seed=st.integers(0, 2**64 - 1), max_shift=st.integers(1, 3))
def test_augment_shift_only_is_an_integer_shift_with_edge_padding(seed, max_shift):
    x = _images(seed % 1000)
    y = augment(Key(seed), x, max_shift=max_shift, max_rotation=0)
    r = range(-max_shift, max_shift + 1)
    candidates = torch.stack([_shift_oracle(x, dx, dy) for dx in r for dy in r])  # (S, B, C, H, W)
    error = (candidates - y).abs().flatten(2).amax(dim=2)  # (S, B)
    assert (error.amin(dim=0) < 1e-5).all(), "some example is not an integer shift within range"


def test_each_example_gets_its_own_draw():
    x = _images(0, b=1, h=16, w=16).expand(32, 1, 16, 16)
    y = augment(Key(0), x)
    distinct = {tuple(v.flatten().round(decimals=4).tolist()) for v in y}
    assert len(distinct) >= 16
    # rotation stays small: output correlates strongly with the input
    assert (y - x).abs().mean() < x.std()


def test_augment_views_shapes_draws_and_identity():
    x = _images(1, b=3)
    v = augment_views(Key(5), x, 4)
    assert v.shape == (3, 4, 1, 12, 12)
    assert not torch.allclose(v[0, 0], v[0, 1])  # views differ
    assert torch.equal(v, augment_views(Key(5), x, 4))
    ident = augment_views(Key(5), x, 1, max_shift=0, max_rotation=0)
    assert torch.equal(ident, x[:, None])


def test_augment_argument_errors_are_named():
    x = _images(0)
    with pytest.raises(TypeError, match="augment: key"):
        augment(0, x)
    with pytest.raises(ValueError, match="augment: images"):
        augment(Key(0), x[0])
    with pytest.raises(ValueError, match="max_shift"):
        augment(Key(0), x, max_shift=-1)
    with pytest.raises(ValueError, match="max_rotation"):
        augment(Key(0), x, max_rotation=200)
    with pytest.raises(ValueError, match="num_views"):
        augment_views(Key(0), x, 0)


def _loss(params, x, y):
    """A one-example loss: x (C, H, W), y scalar."""
    logit = (x.flatten() * params["w"]).sum() + params["b"]
    return (logit - y) ** 2


def test_multiplicity_k1_identity_equals_plain_loss():
    params = {"w": torch.randn(144, generator=Key(0).generator()), "b": torch.tensor(0.3)}
    x, y = _images(2, b=4), torch.tensor([0.0, 1.0, 1.0, 0.0])
    views = augment_views(Key(1), x, 1, max_shift=0, max_rotation=0)
    mloss = multiplicity_loss(_loss)
    for i in range(4):
        assert torch.allclose(mloss(params, views[i], y[i]), _loss(params, x[i], y[i]))


def test_multiplicity_averages_losses_and_gradients_and_nests_in_vmap():
    params = {"w": torch.randn(144, generator=Key(0).generator()), "b": torch.tensor(0.3)}
    x, y = _images(3, b=3), torch.tensor([0.0, 1.0, 1.0])
    views = augment_views(Key(1), x, 5)
    mloss = multiplicity_loss(_loss)
    per_example = torch.func.vmap(torch.func.grad(mloss), in_dims=(None, 0, 0))(params, views, y)
    for i in range(3):
        expected_loss = torch.stack([_loss(params, views[i, k], y[i]) for k in range(5)]).mean()
        assert torch.allclose(mloss(params, views[i], y[i]), expected_loss)
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        oracle = torch.stack([_loss(p, views[i, k], y[i]) for k in range(5)]).mean()
        grads = torch.autograd.grad(oracle, list(p.values()))
        for name, g in zip(p, grads):
            assert torch.allclose(per_example[name][i], g, atol=1e-5)
