"""dpfunc.bridge: ordinary ``nn.Module`` code in, dpfunc's pure functions out.

Everything that knows about modules (functionalisation, model surgery, optimizers that mutate
``.grad``) lives here; the functional core in :mod:`dpfunc` never holds a module.

* :func:`functionalize` — module → ``(apply_fn, params, buffers)`` (:func:`module_apply_fn`: the apply function alone)
* :func:`validate` / :func:`assert_valid` — find layers that break per-example privacy
* :func:`fix` — a new module with BatchNorm → GroupNorm (and InstanceNorm without running stats)
* :func:`fast_engine` — per-example clipping without per-example gradients (ghost norms, book-keeping)
* :func:`make_private` / :class:`PrivacyEngine` — an unchanged torch loop, made private
* :func:`save_checkpoint` / :func:`load_checkpoint` — atomic, versioned, no pickled code
  (:func:`atomic_write` for any other file that must never be torn)
"""

from dpfunc.bridge.fast import fast_engine
from dpfunc.bridge.checkpoint import FORMAT_VERSION, CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from dpfunc.bridge.fix import Norm, default_num_groups, fix
from dpfunc.bridge.functional import ApplyFn, functionalize, keyed_global_rng, module_apply_fn, split_state
from dpfunc.bridge.loader import LogicalBatchPlan, PoissonBatchSampler, poisson_loader
from dpfunc.bridge.private import DPOptimizer, PrivacyEngine, PrivateModule, make_private
from dpfunc.bridge.validate import ModuleValidationError, Problem, Severity, assert_valid, validate

__all__ = [
    # functionalisation
    "functionalize",
    "module_apply_fn",
    "split_state",
    "keyed_global_rng",
    "ApplyFn",
    # validation and surgery
    "validate",
    "assert_valid",
    "Problem",
    "Severity",
    "ModuleValidationError",
    "fix",
    "Norm",
    "default_num_groups",
    # fast per-example clipping (ghost norms / book-keeping)
    "fast_engine",
    # private training
    "make_private",
    "PrivacyEngine",
    "PrivateModule",
    "DPOptimizer",
    "poisson_loader",
    "PoissonBatchSampler",
    "LogicalBatchPlan",
    # checkpoints
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write",
    "CheckpointError",
    "FORMAT_VERSION",
]
