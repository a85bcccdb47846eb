"""Segmentation under DP: MSD loader, CT phantoms, patient-level DP training of a U-Net (or of a small head on fixed
features, ``SegModel.FEATURES``), Dice / IoU / Hausdorff-95 metrics.

The unit of privacy is the patient (all of their slices are one example for sampling and clipping);
see :mod:`dpfunc.segmentation._patient` for the adjacency and the guarantee. nibabel (the
``dpfunc[segmentation]`` extra) is needed to read and write NIfTI only.
"""

from dpfunc.segmentation._figures import plot_overlays
from dpfunc.segmentation._metrics import (dice_score, hausdorff95, iou_score, largest_component, mean_ci, predict_volume,
                                          surface_voxels)
from dpfunc.segmentation._msd import HUWindow, PatientVolume, SliceSelection, read_msd, read_nifti_slices, split_patients
from dpfunc.segmentation._patient import (
    Engine,
    PackedSegmenter,
    PrivacyUnit,
    packed_losses,
    patient_batch,
    patient_loss,
    segmentation_engine,
    slice_batch,
    slice_losses,
)
from dpfunc.segmentation._normalize import VolumeNorm, normalize_volume, rank_normalize
from dpfunc.segmentation._phantoms import make_phantoms, phantom_volume
from dpfunc.segmentation._train import (
    PatientScores,
    SegModel,
    SegmentationConfig,
    SegmentationResult,
    ema_update,
    evaluate_patients,
    evaluate_segmentation_run,
    is_segmentation_run,
    train_segmentation,
)

__all__ = [
    "HUWindow",
    "PatientVolume",
    "SliceSelection",
    "read_msd",
    "read_nifti_slices",
    "split_patients",
    "VolumeNorm",
    "rank_normalize",
    "normalize_volume",
    "make_phantoms",
    "phantom_volume",
    "PrivacyUnit",
    "Engine",
    "PackedSegmenter",
    "slice_losses",
    "packed_losses",
    "patient_batch",
    "slice_batch",
    "patient_loss",
    "segmentation_engine",
    "dice_score",
    "iou_score",
    "hausdorff95",
    "surface_voxels",
    "largest_component",
    "mean_ci",
    "predict_volume",
    "plot_overlays",
    "SegmentationConfig",
    "SegModel",
    "SegmentationResult",
    "train_segmentation",
    "evaluate_segmentation_run",
    "evaluate_patients",
    "PatientScores",
    "is_segmentation_run",
    "ema_update",
]
