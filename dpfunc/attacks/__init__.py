"""Attacks that check what the privacy protections stop: gradient inversion and image metrics.

* :func:`invert_gradients` (Inverting Gradients, Geiping et al. 2020) and :func:`dlg` (Zhu et al.
  2019) reconstruct images from a :class:`SharedUpdate`; :func:`recover_label` (iDLG) and
  :func:`infer_label_counts` recover labels.
* :func:`shared_update` builds what the server sees in each :class:`Scenario` (non-private, clipping
  only, DP-SGD, securely aggregated sum of sites) from dpfunc's own DP-SGD transform.
* :func:`psnr`, :func:`ssim`, :func:`mse`, :func:`match_reconstructions`, :func:`score_reconstructions`
  judge reconstructions against the originals and against data-only baselines.

Example:
    >>> from dpfunc.attacks import Scenario, ThreatModel, shared_update, invert_gradients  # doctest: +SKIP
"""

from dpfunc.attacks.inversion import (
    DLGConfig,
    InversionResult,
    InvertingGradientsConfig,
    SharedUpdate,
    dlg,
    infer_label_counts,
    invert_gradients,
    model_update,
    recover_label,
    total_variation,
)
from dpfunc.attacks.metrics import ReconstructionScores, match_reconstructions, mse, psnr, score_reconstructions, ssim
from dpfunc.attacks.scenarios import Scenario, ThreatModel, shared_update

__all__ = [
    "SharedUpdate",
    "InvertingGradientsConfig",
    "DLGConfig",
    "InversionResult",
    "model_update",
    "total_variation",
    "invert_gradients",
    "dlg",
    "recover_label",
    "infer_label_counts",
    "Scenario",
    "ThreatModel",
    "shared_update",
    "mse",
    "psnr",
    "ssim",
    "match_reconstructions",
    "ReconstructionScores",
    "score_reconstructions",
]
