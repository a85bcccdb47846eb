"""PneumoniaMNIST (MedMNIST v2): paediatric chest X-rays, normal (0) vs pneumonia (1).

The loader returns an :class:`ImageDataset` of float32 images ``(N, 1, size, size)`` and int64 labels
``(N,)``. Pixels are normalised with *fixed* constants by default, so the transform carries no
information about any example; normalising with statistics of the training split is possible but
explicit (:func:`train_normalization`), because those statistics are a function of private data.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dpfunc.data import _files
from dpfunc.data._files import how_to_get

__all__ = [
    "CLASS_NAMES",
    "SPLITS",
    "Normalization",
    "FIXED",
    "UNIT",
    "ImageDataset",
    "pneumoniamnist",
    "train_normalization",
]

CLASS_NAMES: tuple[str, ...] = ("normal", "pneumonia")
SPLITS: tuple[str, ...] = ("train", "val", "test")
_NATIVE_SIZE = 28
_ARRAY_CACHE: dict[tuple[str, int, int, str], tuple[np.ndarray, np.ndarray]] = {}


@dataclass(frozen=True)
class Normalization:
    """Affine pixel normalisation ``x = (pixel / 255 - mean) / std``.

    Attributes:
        mean: subtracted after scaling pixels to [0, 1].
        std: divisor, > 0.

    Use the module constants :data:`FIXED` (maps [0, 255] to [-1, 1]; the default) or :data:`UNIT`
    ([0, 1]); both are data-independent. :func:`train_normalization` computes one from the training
    split (not data-independent, see there).
    """

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (isinstance(self.mean, (int, float)) and math.isfinite(self.mean)):
            raise ValueError(f"Normalization: mean must be a finite number, got {self.mean!r}")
        if not (isinstance(self.std, (int, float)) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"Normalization: std must be a finite number > 0, got {self.std!r}")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map uint8-range pixels (any shape) to normalised float32."""
        return (pixels.to(torch.float32) / 255.0 - self.mean) / self.std


#: Fixed, data-independent: ``(pixel / 255 - 0.5) / 0.5`` in [-1, 1]. The default.
FIXED = Normalization(mean=0.5, std=0.5)
#: Fixed, data-independent: ``pixel / 255`` in [0, 1].
UNIT = Normalization(mean=0.0, std=1.0)


class ImageDataset(torch.utils.data.Dataset):
    """A map-style dataset of images and integer labels held in memory.

    Attributes:
        images: float32 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
        classes: class names, ``classes[label]``.

    ``dataset[i]`` is ``(images[i], labels[i])``; indexing with a tensor or list of indices returns
    the batch ``(images[idx], labels[idx])``, which is what Poisson sampling wants.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...] = CLASS_NAMES
    ):
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"ImageDataset: need images (N, C, H, W) and labels (N,), got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.classes = tuple(classes)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def class_counts(self) -> dict[str, int]:
        """Number of examples per class name."""
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))

    def __repr__(self) -> str:
        return (
            f"ImageDataset(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
            f"classes={self.classes}, counts={self.class_counts()})"
        )


def _find_file(fn: str, data_dir, download: bool) -> Path:
    return _files.locate_pneumoniamnist(data_dir, download=download, fn=fn)


def _read_split(fn: str, path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(images uint8 (N, 28, 28), labels int64 (N,))``, cached by path, size, mtime."""
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns, split)
    if cache_key in _ARRAY_CACHE:
        return _ARRAY_CACHE[cache_key]
    bad = f"{fn}: {path} is not a valid PneumoniaMNIST file"
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {f"{split}_images", f"{split}_labels"} - set(archive.files)
            if missing:
                raise ValueError(
                    f"{bad}: keys {sorted(missing)} missing (found {sorted(archive.files)}). "
                    f"{how_to_get()}"
                )
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"]
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(bad):
            raise
        raise ValueError(f"{bad} (unreadable: {type(err).__name__}: {err}). {how_to_get()}") from err
    n = images.shape[0] if images.ndim >= 1 else -1
    if images.ndim != 3 or images.shape[1:] != (_NATIVE_SIZE, _NATIVE_SIZE) or n == 0:
        raise ValueError(
            f"{bad}: {split}_images must have shape (N, 28, 28) with N >= 1, got "
            f"{images.shape}. {how_to_get()}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{bad}: {split}_images must be uint8, got {images.dtype}. {how_to_get()}")
    if labels.shape not in ((n,), (n, 1)):
        raise ValueError(
            f"{bad}: {split}_labels must have shape ({n}, 1) to match the images, got "
            f"{labels.shape}. {how_to_get()}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"{bad}: {split}_labels must be integers, got {labels.dtype}. {how_to_get()}"
        )
    labels = labels.reshape(n).astype(np.int64)
    if labels.min() < 0 or labels.max() > 1:
        raise ValueError(
            f"{bad}: {split}_labels must be 0 (normal) or 1 (pneumonia), got values "
            f"{sorted(set(np.unique(labels).tolist()))}. {how_to_get()}"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    _ARRAY_CACHE[cache_key] = (images, labels)
    return images, labels


def _check_args(fn: str, split: str, size: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"{fn}: split must be one of {SPLITS}, got {split!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < _NATIVE_SIZE:
        raise ValueError(
            f"{fn}: size must be an int >= {_NATIVE_SIZE} (28 = native, larger = bilinear "
            f"upsampling, e.g. 64 for ResNet-18), got {size!r}"
        )


def pneumoniamnist(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    size: int = 28,
    normalization: Normalization = FIXED,
    download: bool = False,
    verify_checksum: bool = True,
) -> ImageDataset:
    """Load a split of PneumoniaMNIST as an in-memory dataset.

    Args:
        split: ``"train"`` (4708 images), ``"val"`` (524) or ``"test"`` (624).
        data_dir: folder holding ``pneumoniamnist.npz`` (or the file itself); None falls back to
            ``$DPFUNC_DATA``, then ``$XDG_CACHE_HOME/dpfunc`` (``~/.cache/dpfunc``).
        size: output side length; 28 is native, larger sizes are bilinear upsampling
            (``align_corners=False``), e.g. 64 for ResNet-18.
        normalization: pixel transform, default :data:`FIXED` = ``(pixel/255 - 0.5)/0.5``, a
            data-independent constant that costs no privacy. :func:`train_normalization` instead
            reads the training split: account for it or treat it as public.
        download: if the file is missing, download the official file into the folder (opt-in).
        verify_checksum: check the md5/sha256 against the known ones (cached per file version);
            switch off only for a file you built yourself. Structure is always checked.

    Returns:
        An :class:`ImageDataset` with ``images`` float32 ``(N, 1, size, size)``, ``labels`` int64
        ``(N,)`` (0 = normal, 1 = pneumonia) and ``classes == ("normal", "pneumonia")``.

    Raises:
        FileNotFoundError: no file; the message says where it looked and how to get it.
        ValueError: bad arguments, or a corrupt file (checksum, truncated zip, keys, shapes, labels).

    Example:
        >>> train = pneumoniamnist("train", "/work/shared/data")  # doctest: +SKIP
        >>> train.images.shape, train.class_counts()  # doctest: +SKIP
        (torch.Size([4708, 1, 28, 28]), {'normal': 1214, 'pneumonia': 3494})

    References:
        J. Yang et al., "MedMNIST v2", Scientific Data 10:41 (2023); D. Kermany et al., Cell 172(5)
        (2018). Licence CC BY 4.0.
    """
    fn = "pneumoniamnist"
    _check_args(fn, split, size)
    if not isinstance(normalization, Normalization):
        raise TypeError(
            f"{fn}: normalization must be a Normalization (FIXED, UNIT, or train_normalization()), "
            f"got {normalization!r}"
        )
    path = _find_file(fn, data_dir, download)
    if verify_checksum:
        _files.verify_checksum(path, fn=fn)
    images, labels = _read_split(fn, path, split)
    x = normalization(torch.from_numpy(np.array(images)).unsqueeze(1))  # (N, 1, 28, 28)
    if size != _NATIVE_SIZE:
        # Affine normalisation commutes with bilinear interpolation (convex weights).
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ImageDataset(x.contiguous(), torch.from_numpy(np.array(labels)), CLASS_NAMES)


def train_normalization(
    data_dir: str | os.PathLike | None = None, *, verify_checksum: bool = True
) -> Normalization:
    """Mean and standard deviation of the *training split* pixels (in [0, 1]).

    Not data-independent: these two numbers are computed from the private training images, so a
    DP user must either count their release in the privacy budget or argue the statistics are
    public (e.g. taken from another data set). The default :data:`FIXED` needs no such argument.

    Example:
        >>> norm = train_normalization("/work/shared/data")  # doctest: +SKIP
        >>> val = pneumoniamnist("val", "/work/shared/data", normalization=norm)  # doctest: +SKIP
    """
    fn = "train_normalization"
    path = _find_file(fn, data_dir, download=False)
    if verify_checksum:
        _files.verify_checksum(path, fn=fn)
    images, _ = _read_split(fn, path, "train")
    x = images.astype(np.float64) / 255.0
    return Normalization(mean=float(x.mean()), std=float(x.std()))
