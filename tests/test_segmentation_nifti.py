"""Segmentation data: the NIfTI/MSD loader (orientation, windowing, label alignment) and the phantoms.

Skipped with a reason when nibabel (the ``dpfunc[segmentation]`` extra, part of ``dpfunc[test]``) is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpfunc.keys import Key
from dpfunc.segmentation import HUWindow, SliceSelection, phantom_volume, split_patients

nib = pytest.importorskip("nibabel", reason="NIfTI tests need nibabel: pip install 'dpfunc[segmentation]'")

from dpfunc.segmentation import make_phantoms, read_msd, read_nifti_slices  # noqa: E402


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


# Three storages of the same patient: RAS (identity), LPS-like (x and y flipped), and x/y swapped.
_AFFINES = {
    "ras": np.eye(4),
    "lps": np.diag([-1.0, -1.0, 1.0, 1.0]),
    "swapped": np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
}


def _store(name: str, ras: np.ndarray) -> np.ndarray:
    """The data array that, under affine ``_AFFINES[name]``, holds the RAS-indexed volume ``ras``."""
    if name == "ras":
        return ras
    if name == "lps":
        return ras[::-1, ::-1, :]
    return ras.transpose(1, 0, 2)


@pytest.mark.parametrize("storage", sorted(_AFFINES))
def test_loader_orientation_windowing_and_label_alignment(tmp_path, storage):
    # RAS-indexed 8×8×4 volume: soft tissue (40 HU); a bright marker in the patient's RIGHT-ANTERIOR corner
    # (x max, y max) on slice 2, and the label on the same voxel and one more in the LEFT-POSTERIOR corner.
    ras = np.full((8, 8, 4), 40, dtype=np.int16)
    ras[7, 7, 2] = 240
    ras[0, 0, 1] = -1000
    lab = np.zeros((8, 8, 4), dtype=np.uint8)
    lab[7, 7, 2] = 1
    lab[0, 0, 1] = 2
    _write(tmp_path / "img.nii.gz", _store(storage, ras), _AFFINES[storage])
    _write(tmp_path / "lab.nii.gz", _store(storage, lab), _AFFINES[storage])
    vol = read_nifti_slices(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", image_size=8, selection=SliceSelection.ALL)
    assert vol.images.shape == (4, 1, 8, 8) and vol.labels.shape == (4, 8, 8) and vol.name == "img"
    # radiological display: row 0 = anterior, column 0 = patient's right
    assert vol.images[2, 0, 0, 0] == 1.0 and vol.labels[2, 0, 0] == 1
    assert vol.images[1, 0, 7, 7] == 0.0 and vol.labels[1, 7, 7] == 1  # tumour (2) counts as organ by default
    assert torch.allclose(vol.images[0], torch.full((1, 8, 8), 0.5))  # 40 HU in [-160, 240] -> 0.5
    assert int(vol.labels.sum()) == 2
    only_liver = read_nifti_slices(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", image_size=8,
                                   selection="all", foreground_labels=[1])
    assert int(only_liver.labels.sum()) == 1
    # ORGAN selection: slices 1..2 hold label, margin 1 adds 0 and 3 (clipped to the volume)
    organ = read_nifti_slices(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", image_size=8, selection=SliceSelection.ORGAN, margin=0)
    assert organ.images.shape[0] == 2 and organ.labels[1, 0, 0] == 1
    # resizing keeps image and label aligned: a 2×2 block in the right-anterior corner stays there
    big = np.full((16, 16, 1), -1000, dtype=np.int16)
    big[12:, 12:, 0] = 240
    blab = (big > 0).astype(np.uint8)
    _write(tmp_path / "b.nii.gz", _store(storage, big), _AFFINES[storage])
    _write(tmp_path / "bl.nii.gz", _store(storage, blab), _AFFINES[storage])
    small = read_nifti_slices(tmp_path / "b.nii.gz", tmp_path / "bl.nii.gz", image_size=8, selection="all",
                              window=HUWindow(-1000, 240))
    assert torch.equal(small.labels[0, :2, :2], torch.ones(2, 2, dtype=torch.int64)) and int(small.labels.sum()) == 4
    assert float(small.images[0, 0, 0, 0]) > 0.95 and float(small.images[0, 0, :2, :2].mean()) > 0.75
    assert float(small.images[0, 0, 3:, 3:].max()) < 0.05 and float(small.images[0, 0, :, 4:].max()) < 0.05


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="read_msd: no dataset.json"):
        read_msd(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match="a.nii.gz, which does not exist"):
        read_msd(tmp_path)
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(ValueError, match="is not an MSD dataset.json"):
        read_msd(tmp_path)
    with pytest.raises(ValueError, match="read_msd: image_size"):
        read_msd(tmp_path, image_size=4)
    with pytest.raises(ValueError, match="read_msd: selection"):
        read_msd(tmp_path, selection="some")
    with pytest.raises(ValueError, match="HUWindow: high must be > low"):
        HUWindow(100, 100)


def test_phantoms_round_trip_deterministic_and_split(tmp_path):
    make_phantoms(tmp_path / "a", patients=3, seed=7, size=32, slices=6, progress=False)
    make_phantoms(tmp_path / "b", patients=3, seed=7, size=32, slices=6, progress=False)
    make_phantoms(tmp_path / "c", patients=3, seed=8, size=32, slices=6, progress=False)
    meta = json.loads((tmp_path / "a" / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["labels"]["1"] == "liver"
    wide = HUWindow(-1024, 3071)
    a = read_msd(tmp_path / "a", image_size=32, window=wide, selection="all")
    b = read_msd(tmp_path / "b", image_size=32, window=wide, selection="all")
    c = read_msd(tmp_path / "c", image_size=32, window=wide, selection="all")
    assert [p.name for p in a] == ["liver_0", "liver_1", "liver_2"]
    for pa, pb, pc, i in zip(a, b, c, range(3)):
        assert torch.equal(pa.images, pb.images) and torch.equal(pa.labels, pb.labels)
        assert not torch.equal(pa.images, pc.images)
        hu, label = phantom_volume(Key(7).fold_in(i), size=32, slices=6)  # what was written comes back
        torch.testing.assert_close(pa.images[:, 0] * (3071 + 1024) - 1024, hu.double().float(), atol=2e-3, rtol=0)
        assert torch.equal(pa.labels, (label > 0).long())
        assert pa.labels.sum() > 0  # every phantom has a liver
    with pytest.raises(FileExistsError, match="make_phantoms: .* already holds a dataset.json"):
        make_phantoms(tmp_path / "a", patients=1, seed=0, size=32, slices=6, progress=False)
    train, val, test = split_patients(a + [p._replace(name=f"x{i}") for i, p in enumerate(a)], Key(0))
    names = [p.name for p in train + val + test]
    assert len(names) == len(set(names)) == 6 and len(val) == len(test) == 1
    again = split_patients(list(reversed(a + [p._replace(name=f"x{i}") for i, p in enumerate(a)])), Key(0))
    assert [p.name for p in again[2]] == [p.name for p in test]  # independent of the input order


@pytest.mark.parametrize("storage", sorted(_AFFINES))
def test_loader_spacing_in_mm_follows_orientation_and_resizing(tmp_path, storage):
    # RAS voxel size 0.5 mm (x, patient left-right) × 0.8 mm (y, anterior-posterior) × 3 mm (z, slices)
    # on a 16 (x) × 8 (y) × 4 (z) grid, read at 8×8: rows are y (8 -> 8: 0.8 mm), columns x (16 -> 8: 1.0 mm).
    ras = np.full((16, 8, 4), 40, dtype=np.int16)
    lab = np.zeros((16, 8, 4), dtype=np.uint8)
    lab[3:9, 2:5, 1:3] = 1
    scale = np.diag([0.5, 0.8, 3.0, 1.0])
    affine = _AFFINES[storage] @ scale if storage != "swapped" else _AFFINES[storage] @ np.diag([0.8, 0.5, 3.0, 1.0])
    _write(tmp_path / "img.nii.gz", _store(storage, ras), affine)
    _write(tmp_path / "lab.nii.gz", _store(storage, lab), affine)
    vol = read_nifti_slices(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", image_size=8, selection="all")
    assert vol.spacing == pytest.approx((3.0, 0.8, 1.0))
    # HD95 in mm: the label against itself shifted by one slice is one slice thickness (3 mm) away
    from dpfunc.segmentation import hausdorff95

    shifted = torch.roll(vol.labels, 1, dims=0)
    assert hausdorff95(shifted, vol.labels, spacing=vol.spacing) == pytest.approx(3.0)
