"""dpfunc: differentially private deep learning, written the functional way on ``torch.func``.

Pure functions on ``dict[str, Tensor]`` parameters; randomness from explicit keys; privacy ledgers
that travel with the training state. ``dpfunc.bridge`` connects ordinary ``nn.Module`` code.
"""

from dpfunc._version import __version__
from dpfunc import accounting
from dpfunc.accounting import (
    PrivacyBudget,
    PrivacyBudgetExceededError,
    dpsgd_epsilon,
    epsilon,
    noise_multiplier_for,
)
from dpfunc.accounting.ledger import Mechanism, Phase, PrivacyLedger
from dpfunc.adaptive_clipping import AdaptiveClipping, AdaptiveClippingState, adaptive_dpadam, adaptive_dpsgd, adaptive_dp_aggregate
from dpfunc.clipping import ClippedSum, Clipping, FlatClipping, PerLayerClipping, clip_and_sum
from dpfunc.keys import Key, RunKeys, run_keys
from dpfunc.noise import gaussian_noise, privatize
from dpfunc.per_example import per_example_grads, per_example_grads_and_losses
from dpfunc.private import DPAggregateState, DPConfig, dp_aggregate, noise_key, dpadam, dpsgd, find_dp_state, privacy_ledger
from dpfunc.sampling import pad_batch, padded_batch_size, poisson_batches, poisson_sample
from dpfunc.step import EngineOutput, GradEngine, StepMetrics, make_step, vmap_engine
from dpfunc.transforms import (
    GradientTransformation,
    adam,
    adamw,
    add_decayed_weights,
    apply_updates,
    chain,
    clip_by_global_norm,
    identity,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    sgd,
    trace,
)

__all__ = [
    "__version__",
    # keys
    "Key",
    "RunKeys",
    "run_keys",
    # per-example gradients and clipping
    "per_example_grads",
    "per_example_grads_and_losses",
    "FlatClipping",
    "PerLayerClipping",
    "Clipping",
    "ClippedSum",
    "clip_and_sum",
    "AdaptiveClipping",
    "AdaptiveClippingState",
    "adaptive_dp_aggregate",
    "adaptive_dpsgd",
    "adaptive_dpadam",
    # noise and the DP transform
    "gaussian_noise",
    "privatize",
    "DPConfig",
    "DPAggregateState",
    "dp_aggregate",
    "noise_key",
    "dpsgd",
    "dpadam",
    "find_dp_state",
    "privacy_ledger",
    # transforms
    "GradientTransformation",
    "chain",
    "identity",
    "scale",
    "scale_by_learning_rate",
    "add_decayed_weights",
    "clip_by_global_norm",
    "trace",
    "scale_by_adam",
    "sgd",
    "adam",
    "adamw",
    "apply_updates",
    # sampling
    "poisson_sample",
    "poisson_batches",
    "pad_batch",
    "padded_batch_size",
    # the step
    "make_step",
    "vmap_engine",
    "GradEngine",
    "EngineOutput",
    "StepMetrics",
    # accounting (the full suite is dpfunc.accounting)
    "accounting",
    "PrivacyLedger",
    "Phase",
    "Mechanism",
    "PrivacyBudget",
    "PrivacyBudgetExceededError",
    "epsilon",
    "dpsgd_epsilon",
    "noise_multiplier_for",
]
