"""Synthetic CT phantoms in the MSD layout, so the whole segmentation path runs without real data.

A phantom is NOT a CT scan: it is a pile of ellipses with CT-like Hounsfield units, enough to
exercise reading, windowing, slice selection, training and evaluation. Results on phantoms
demonstrate the pipeline, not clinical accuracy.

Each patient ``p`` is drawn from ``Key(seed).fold_in(p)`` only, so a folder is a pure function of
``(patients, seed, size, slices)`` and patient ``p`` is the same in every folder with that seed.

What a phantom holds (HU = Hounsfield units; axial slices, radiological convention):

* air (-1000) around a body ellipse of random size and position, with a fat rim (-100) around soft
  tissue (+40);
* a vertebra (bone, +700) and an aorta (+150 to +200, contrast) behind;
* a stomach on the patient's left with gas (-600) over fluid (+10), and two kidneys in the lower half
  of the volume whose intensity (+40 to +160) may equal the liver's, so intensity alone does not segment;
* a **liver** (label 1) on the patient's right: a star-shaped blob (radius modulated by three random
  harmonics) whose cross-section grows and shrinks along z like a sphere's, intensity +50 to +90 HU;
* with probability 1/2 a darker spherical **tumour** (label 2) inside the liver;
* Gaussian noise (σ 10 to 25 HU), then rounding to int16.

Volumes are written as int16 NIfTI-1 (``.nii.gz``) with an LPS-like affine
``diag(-s, -s, t)`` (data axis 0 = image columns, axis 1 = image rows), as DICOM-derived files often
are, so the reader's reorientation is exercised. Files are written atomically (temporary name, then
rename); ``dataset.json`` is written last.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from dpfunc._validate import check_int_range
from dpfunc.keys import Key
from dpfunc.segmentation._msd import require_nibabel

__all__ = ["phantom_volume", "make_phantoms"]

_SPACING_XY = 0.8  # mm per pixel at size 512 scales as 512·0.8/size
_SPACING_Z = 2.5


def _ellipse(u, v, cu, cv, a, b):
    return ((u - cu) / a) ** 2 + ((v - cv) / b) ** 2 <= 1.0


def phantom_volume(key: Key, *, size: int = 128, slices: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """One phantom patient, in the display convention of :func:`~dpfunc.segmentation.read_msd`.

    Returns:
        ``(hu, label)``: ``(slices, size, size)`` int16 Hounsfield units and uint8 labels
        (0 background, 1 liver, 2 tumour); rows anterior → posterior, columns patient right → left.

    Example:
        >>> hu, label = phantom_volume(Key(0), size=32, slices=8)
        >>> hu.shape, hu.dtype, int(label.max()) >= 1
        (torch.Size([8, 32, 32]), torch.int16, True)
    """
    fn = "phantom_volume"
    check_int_range(fn, "size", size, low=16, high=1024)
    check_int_range(fn, "slices", slices, low=4, high=2048)
    g = key.generator()

    def uni(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

    lin = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1
    v, u = torch.meshgrid(lin, lin, indexing="ij")  # v: rows (anterior -> posterior), u: columns
    zt = torch.linspace(0, 1, slices, dtype=torch.float64)

    cu, cv = uni(-0.05, 0.05), uni(0.0, 0.1)
    a, b = uni(0.78, 0.9), uni(0.55, 0.68)
    fat = uni(0.04, 0.08)
    spine_r = uni(0.08, 0.11)
    aorta_hu, aorta_r = uni(150, 200), uni(0.05, 0.07)
    kidney_hu = uni(40, 160)
    stomach = (cu + uni(0.3, 0.42), cv - uni(0.05, 0.2), uni(0.14, 0.2))
    z0, z1 = uni(0.05, 0.3), uni(0.65, 0.95)
    liver_c = (cu - uni(0.3, 0.42), cv + uni(-0.15, 0.05))
    liver_r = uni(0.3, 0.4)
    harm = [(uni(0.0, 0.15), uni(0, 2 * math.pi)) for _ in range(3)]
    liver_hu = uni(50, 90)
    has_tumour = uni(0, 1) < 0.5
    tumour_hu = liver_hu - uni(20, 40)
    tumour_r = uni(0.06, 0.1)
    t_angle, t_dist, t_z = uni(0, 2 * math.pi), uni(0.0, 0.4), uni(0.35, 0.65)
    noise_sd = uni(10, 25)

    hu = torch.full((slices, size, size), -1000.0, dtype=torch.float64)
    label = torch.zeros((slices, size, size), dtype=torch.uint8)
    theta = torch.atan2(v - liver_c[1], u - liver_c[0])
    star = 1 + sum(amp * torch.cos((k + 1) * theta + ph) for k, (amp, ph) in enumerate(harm))
    rho = torch.sqrt((u - liver_c[0]) ** 2 + (v - liver_c[1]) ** 2)
    zm, half = (z0 + z1) / 2, (z1 - z0) / 2
    tumour_c = (liver_c[0] + t_dist * liver_r * math.cos(t_angle), liver_c[1] + t_dist * liver_r * math.sin(t_angle))
    for k in range(slices):
        z = float(zt[k])
        breathe = 1 + 0.03 * math.sin(2 * math.pi * z)
        body = _ellipse(u, v, cu, cv, a * breathe, b * breathe)
        inner = _ellipse(u, v, cu, cv, a * breathe - fat, b * breathe - fat)
        sl = hu[k]
        sl[body] = -100.0
        sl[inner] = 40.0
        sl[_ellipse(u, v, cu, cv + 0.72 * b, spine_r, spine_r)] = 700.0
        sl[_ellipse(u, v, cu + 0.1, cv + 0.45 * b, aorta_r, aorta_r)] = aorta_hu
        if z > 0.5:
            for side in (-1, 1):
                sl[_ellipse(u, v, cu + side * 0.38, cv + 0.42 * b, 0.1, 0.15) & inner] = kidney_hu
        if z < 0.6:
            st = _ellipse(u, v, stomach[0], stomach[1], stomach[2], stomach[2]) & inner
            sl[st] = 10.0
            sl[st & (v < stomach[1] - 0.3 * stomach[2])] = -600.0
        if abs(z - zm) < half:
            scale = math.sqrt(1 - ((z - zm) / half) ** 2)
            liver = (rho <= liver_r * scale * star) & inner
            sl[liver] = liver_hu
            label[k][liver] = 1
            if has_tumour:
                dz = (z - t_z) * 2.0  # tumour radius in z, in the same normalised units
                r2 = tumour_r**2 - dz**2
                if r2 > 0:
                    tumour = _ellipse(u, v, tumour_c[0], tumour_c[1], math.sqrt(r2), math.sqrt(r2)) & liver
                    sl[tumour] = tumour_hu
                    label[k][tumour] = 2
    hu = hu + noise_sd * torch.randn(hu.shape, generator=g, dtype=torch.float64)
    return hu.round().clamp(-1024, 3071).to(torch.int16), label


def _save_atomic(nib, data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(nib.Nifti1Image(data, affine), str(tmp))
    os.replace(tmp, path)


def make_phantoms(out: str | Path, *, patients: int, seed: int, size: int = 128, slices: int = 24,
                  progress: bool | None = None) -> Path:
    """Write an MSD-layout folder of ``patients`` phantom volumes (``liver_<p>.nii.gz``).

    Args:
        out: the folder (created; refused if it already holds a ``dataset.json``, to never mix runs).
        patients: number of patients (>= 1).
        seed: root of the phantom keys (any int; 0 is valid).
        size: in-plane side in pixels (16 to 1024).
        slices: axial slices per volume (4 to 2048).
        progress: show a progress bar (None: the project default, see ``dpfunc._progress``).

    Returns:
        ``Path(out)``.

    Raises:
        FileExistsError: ``out/dataset.json`` exists.

    Example:
        >>> make_phantoms("phantoms", patients=40, seed=0)          # doctest: +SKIP
    """
    fn = "make_phantoms"
    nib = require_nibabel(fn)
    check_int_range(fn, "patients", patients, low=1)
    check_int_range(fn, "seed", seed)
    check_int_range(fn, "size", size, low=16, high=1024)
    check_int_range(fn, "slices", slices, low=4, high=2048)
    root = Path(out)
    if (root / "dataset.json").exists():
        raise FileExistsError(f"{fn}: {root} already holds a dataset.json; choose an empty --out folder")
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    sxy = _SPACING_XY * 512 / size
    affine = np.diag([-sxy, -sxy, _SPACING_Z, 1.0])
    from dpfunc._progress import progress as bar

    key = Key(seed)
    training = []
    for p in bar(range(patients), desc="phantoms", unit="patient", enabled=progress):
        hu, label = phantom_volume(key.fold_in(p), size=size, slices=slices)
        # display [z, row, col] -> stored [col, row, z] with affine diag(-s, -s, t) (see the module docstring)
        _save_atomic(nib, np.ascontiguousarray(hu.permute(2, 1, 0).numpy()), affine, root / "imagesTr" / f"liver_{p}.nii.gz")
        _save_atomic(nib, np.ascontiguousarray(label.permute(2, 1, 0).numpy()), affine, root / "labelsTr" / f"liver_{p}.nii.gz")
        training.append({"image": f"./imagesTr/liver_{p}.nii.gz", "label": f"./labelsTr/liver_{p}.nii.gz"})
    meta = {
        "name": "LiverPhantom",
        "description": f"dpfunc synthetic CT phantoms (seed {seed}); NOT clinical data",
        "reference": "dpfunc.segmentation.make_phantoms",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": patients,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    tmp = root / ".dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, root / "dataset.json")
    return root
