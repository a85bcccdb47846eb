"""Data for the paediatric pneumonia case study: PneumoniaMNIST and DP-compatible augmentation.

Example:
    >>> from dpfunc.data import pneumoniamnist
    >>> train = pneumoniamnist("train", "/work/shared/data")  # doctest: +SKIP
"""

from dpfunc.data._files import (
    KNOWN_MD5,
    KNOWN_SHA256,
    PNEUMONIAMNIST_URL,
    DataNotFoundError,
    download_pneumoniamnist,
    resolve_data_dir,
    search_path,
)
from dpfunc.data._pneumoniamnist import (
    CLASS_NAMES,
    FIXED,
    SPLITS,
    UNIT,
    ImageDataset,
    Normalization,
    pneumoniamnist,
    train_normalization,
)
from dpfunc.data.augment import augment, augment_views, multiplicity_loss

__all__ = [
    "CLASS_NAMES",
    "DataNotFoundError",
    "FIXED",
    "KNOWN_MD5",
    "KNOWN_SHA256",
    "PNEUMONIAMNIST_URL",
    "SPLITS",
    "UNIT",
    "ImageDataset",
    "Normalization",
    "augment",
    "augment_views",
    "download_pneumoniamnist",
    "multiplicity_loss",
    "pneumoniamnist",
    "resolve_data_dir",
    "search_path",
    "train_normalization",
]
