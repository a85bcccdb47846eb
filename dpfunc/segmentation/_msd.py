"""Reading a Medical Segmentation Decathlon (MSD) folder: NIfTI CT volumes → windowed axial slices.

The MSD layout (Simpson et al. 2019) is::

    DIR/dataset.json          {"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...], ...}
    DIR/imagesTr/*.nii.gz     CT volumes in Hounsfield units
    DIR/labelsTr/*.nii.gz     label volumes (Task03 Liver: 0 background, 1 liver, 2 tumour)

Each volume goes through the same fixed pipeline, one patient at a time:

1. **Orientation.** ``nibabel.as_closest_canonical`` brings the voxel axes to RAS+; axial slice ``z``
   is then shown in the radiological convention: rows run anterior → posterior, columns run from the
   patient's right to their left (``slice[r, c] = ras[X-1-c, Y-1-r, z]``). The label volume goes
   through exactly the same steps, so image and label stay aligned whatever the stored affine.
2. **Windowing.** Hounsfield units are clipped to a :class:`HUWindow` ``[low, high]`` and scaled to
   ``[0, 1]`` (default ``[-160, 240]``, a usual abdominal soft-tissue window: level 40, width 400).
3. **Labels.** Voxels whose label is in ``foreground_labels`` (default: every non-zero label, so for
   Task03 the liver *including* its tumours) become 1, the rest 0.
4. **Slice selection** (:class:`SliceSelection`): ``ALL`` keeps every axial slice; ``ORGAN`` keeps
   the slices from the first to the last one that contains foreground, extended by ``margin`` slices
   on each side (clipped to the volume). ``ORGAN`` uses the label, so on a test volume it assumes
   the organ's axial extent is known (the usual slice-level evaluation protocol); use ``ALL`` to
   evaluate on whole volumes.
5. **Resizing.** Each slice is resized to ``image_size × image_size`` (bilinear with antialiasing
   for images, nearest-exact for labels; the in-plane aspect ratio is not kept, MSD CT slices are
   square).

References:
    A. L. Simpson et al., "A large annotated medical image dataset for the development and
    evaluation of segmentation algorithms", arXiv:1902.09063 (2019).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dpfunc._validate import check_enum, check_int_range, check_number
from dpfunc.keys import Key

__all__ = ["HUWindow", "SliceSelection", "PatientVolume", "read_msd", "read_nifti_slices", "split_patients", "require_nibabel"]


def require_nibabel(fn: str):
    """Import nibabel or raise an ImportError that names the extra to install."""
    try:
        import nibabel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{fn}: reading and writing NIfTI needs nibabel; install it with "
                          f"`pip install 'dpfunc[segmentation]'`") from e
    return nibabel


@dataclass(frozen=True)
class HUWindow:
    """A CT intensity window: Hounsfield units clipped to ``[low, high]`` and mapped to ``[0, 1]``.

    Example:
        >>> HUWindow(-160, 240).apply(torch.tensor([-1000.0, 40.0, 1000.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """

    low: float = -160.0
    high: float = 240.0

    def __post_init__(self) -> None:
        low = check_number("HUWindow", "low", self.low)
        high = check_number("HUWindow", "high", self.high)
        if not high > low:
            raise ValueError(f"HUWindow: high must be > low, got low={self.low!r}, high={self.high!r}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def apply(self, hu: torch.Tensor) -> torch.Tensor:
        return (hu.clamp(self.low, self.high) - self.low) / (self.high - self.low)


class SliceSelection(enum.Enum):
    """Which axial slices of a volume are kept (see the module docstring)."""

    ALL = "all"
    ORGAN = "organ"


class PatientVolume(NamedTuple):
    """One patient's selected axial slices.

    Attributes:
        name: the image file name without ``.nii.gz`` (e.g. ``"liver_7"``).
        images: ``(S, 1, H, W)`` float32 in ``[0, 1]`` (windowed).
        labels: ``(S, H, W)`` int64, 1 = organ, 0 = background.
        spacing: voxel size in mm of the evaluated grid, ``(slice, row, column)``: the NIfTI header's
            slice thickness, and its in-plane pixel size scaled by original size / resized size; None
            when unknown (volumes built in code). Used for HD95 in mm.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    spacing: tuple[float, float, float] | None = None


def _canonical_slices(nib, path: Path) -> np.ndarray:
    """``(Z, H, W)`` float32 axial slices in the radiological display convention."""
    return _canonical(nib, path)[0]


def _canonical(nib, path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """:func:`_canonical_slices` and the voxel size in mm along its axes ``(Z, H, W)`` (from the RAS+ header)."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    arr = np.asarray(img.get_fdata(dtype=np.float32))
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"read_msd: {path} must hold a 3-D volume, got shape {arr.shape}")
    return np.ascontiguousarray(arr[::-1, ::-1, :].transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0])


def read_nifti_slices(image_path: str | Path, label_path: str | Path, *, image_size: int = 64,
                      window: HUWindow = HUWindow(), selection: SliceSelection = SliceSelection.ORGAN,
                      margin: int = 2, foreground_labels: Sequence[int] | None = None) -> PatientVolume:
    """One patient: read, orient, window, select and resize (steps 1–5 of the module docstring).

    Raises:
        ValueError: image and label volumes of different shapes, or a non-3-D volume.
    """
    fn = "read_nifti_slices"
    nib = require_nibabel(fn)
    image_path, label_path = Path(image_path), Path(label_path)
    hu, zooms = _canonical(nib, image_path)
    lab = _canonical_slices(nib, label_path)
    if hu.shape != lab.shape:
        raise ValueError(f"{fn}: image {image_path.name} has shape {hu.shape} but its label has {lab.shape} (after reorientation)")
    lab_int = np.rint(lab).astype(np.int64)
    if foreground_labels is None:
        fg = lab_int != 0
    else:
        fg = np.isin(lab_int, np.asarray(list(foreground_labels), dtype=np.int64))
    z = np.arange(hu.shape[0])
    if selection is SliceSelection.ORGAN:
        present = np.nonzero(fg.reshape(fg.shape[0], -1).any(1))[0]
        if present.size:
            z = np.arange(max(0, present[0] - margin), min(hu.shape[0], present[-1] + margin + 1))
    images = window.apply(torch.from_numpy(hu[z]))
    labels = torch.from_numpy(fg[z].astype(np.float32))
    size = (image_size, image_size)
    if images.shape[-2:] != size:
        images = F.interpolate(images[:, None], size=size, mode="bilinear", antialias=True, align_corners=False)[:, 0]
        labels = F.interpolate(labels[:, None], size=size, mode="nearest-exact")[:, 0]
    name = image_path.name.removesuffix(".gz").removesuffix(".nii")
    spacing = (zooms[0], zooms[1] * hu.shape[1] / image_size, zooms[2] * hu.shape[2] / image_size)
    return PatientVolume(name, images[:, None].contiguous().float(), labels.round().to(torch.int64).contiguous(), spacing)


def read_msd(data_dir: str | Path, *, image_size: int = 64, window: HUWindow = HUWindow(),
             selection: SliceSelection | str = SliceSelection.ORGAN, margin: int = 2,
             foreground_labels: Sequence[int] | None = None, limit: int | None = None) -> list[PatientVolume]:
    """Every training patient of an MSD folder (its ``dataset.json`` ``"training"`` list), in file order.

    Args:
        data_dir: the folder holding ``dataset.json``, ``imagesTr/``, ``labelsTr/``.
        image_size: side of the square slices (64, 128, 256 …; any int >= 8).
        window: the HU window.
        selection: ``SliceSelection.ALL`` or ``ORGAN`` (or ``"all"`` / ``"organ"``).
        margin: slices kept on each side of the organ's extent with ``ORGAN`` (>= 0).
        foreground_labels: label values that count as the organ (default: all non-zero).
        limit: read only the first ``limit`` patients (None: all).

    Returns:
        A list of :class:`PatientVolume`, one per patient.

    Raises:
        FileNotFoundError: no ``dataset.json`` or a listed file is missing (the message names it).
        ValueError: a malformed ``dataset.json`` or bad arguments.

    Example:
        >>> patients = read_msd("phantoms", image_size=64)          # doctest: +SKIP
        >>> patients[0].images.shape, patients[0].labels.shape     # doctest: +SKIP
        (torch.Size([S, 1, 64, 64]), torch.Size([S, 64, 64]))
    """
    fn = "read_msd"
    check_int_range(fn, "image_size", image_size, low=8, high=1024)
    check_int_range(fn, "margin", margin, low=0)
    if limit is not None:
        check_int_range(fn, "limit", limit, low=1)
    if not isinstance(window, HUWindow):
        raise TypeError(f"{fn}: window must be a HUWindow, got {window!r}")
    selection = check_enum(fn, "selection", selection, SliceSelection)
    root = Path(data_dir)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{fn}: no dataset.json in {root}; give the MSD task folder (with imagesTr/ and "
                                f"labelsTr/), or write phantoms with `dpfunc make-phantoms --out {root}`")
    try:
        meta = json.loads(meta_path.read_text())
        entries = meta["training"]
        pairs = [(e["image"], e["label"]) for e in entries]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{fn}: {meta_path} is not an MSD dataset.json (needs a 'training' list of "
                         f"{{'image': ..., 'label': ...}}): {e}") from None
    if not pairs:
        raise ValueError(f"{fn}: {meta_path} lists no training volumes")
    if limit is not None:
        pairs = pairs[:limit]
    out = []
    for image_rel, label_rel in pairs:
        image_path, label_path = root / image_rel, root / label_rel
        for p in (image_path, label_path):
            if not p.is_file():
                raise FileNotFoundError(f"{fn}: {meta_path} lists {p}, which does not exist")
        out.append(read_nifti_slices(image_path, label_path, image_size=image_size, window=window,
                                     selection=selection, margin=margin, foreground_labels=foreground_labels))
    return out


def split_patients(patients: Sequence[PatientVolume], key: Key, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
                   ) -> tuple[list[PatientVolume], list[PatientVolume], list[PatientVolume]]:
    """A patient-level train / validation / test split: no patient's slices fall on two sides.

    Patients are permuted by ``key`` (after sorting by name, so the split does not depend on file
    order); the validation and test parts get ``round(fraction · n)`` patients each (at least one
    each when there are >= 3 patients), the training part the rest.

    Example:
        >>> train, val, test = split_patients(patients, Key(0))     # doctest: +SKIP
    """
    fn = "split_patients"
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.Key, got {type(key).__name__}")
    if len(fractions) != 3 or any(not (0 <= check_number(fn, "fractions", f) <= 1) for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"{fn}: fractions must be three numbers in [0, 1] summing to 1, got {fractions!r}")
    n = len(patients)
    if n < 3:
        raise ValueError(f"{fn}: need at least 3 patients for a train/val/test split, got {n}")
    names = [p.name for p in patients]
    if len(set(names)) != n:
        raise ValueError(f"{fn}: patient names must be unique (they identify the unit of privacy)")
    ordered = sorted(patients, key=lambda p: p.name)
    perm = torch.randperm(n, generator=key.generator()).tolist()
    n_val = max(1, round(fractions[1] * n)) if fractions[1] > 0 else 0
    n_test = max(1, round(fractions[2] * n)) if fractions[2] > 0 else 0
    if n_val + n_test >= n:
        raise ValueError(f"{fn}: fractions {fractions} leave no training patient out of {n}")
    val = [ordered[i] for i in perm[:n_val]]
    test = [ordered[i] for i in perm[n_val:n_val + n_test]]
    train = [ordered[i] for i in perm[n_val + n_test:]]
    return train, val, test
