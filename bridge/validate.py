"""Check a module for layers that break per-example privacy or per-example gradients.

DP-SGD bounds each example's influence by clipping *its* gradient. That bound holds only if example
``i``'s loss depends on example ``i`` alone and the forward pass leaks nothing else:

    =====================================  ========  ====================================================
    finding                                severity  why
    =====================================  ========  ====================================================
    BatchNorm (any, incl. SyncBatchNorm)   error     training mode normalises by batch statistics, so
                                                     each output mixes all examples of the batch; the
                                                     running statistics are a non-private summary of
                                                     the data updated at every forward
    InstanceNorm with running stats        error     running statistics are updated from the data in
                                                     every forward and not accounted for
    module whose forward changes a buffer  error     (checked when ``example_input`` is given) a buffer
                                                     written from data escapes clipping and noise
    other module with buffers              warning   cannot be checked statically; pass
                                                     ``example_input`` to check it
    parameters outside Linear, Conv1d/2d,  info      the fast clipping path has no rule for the layer;
    Embedding, LayerNorm, GroupNorm                  its parameters fall back to vmap (correct, slower)
    =====================================  ========  ====================================================

:func:`dpfunc.bridge.fix` repairs the errors it knows (BatchNorm, InstanceNorm running stats).
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["Severity", "Problem", "validate", "assert_valid", "ModuleValidationError"]

# Layers the fast clipping path handles (bridge/fast); used when that package cannot be imported.
_FAST_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)


class Severity(enum.Enum):
    """How bad a :class:`Problem` is: ``ERROR`` breaks the privacy guarantee; ``WARNING`` may;
    ``INFO`` costs speed only."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`validate`.

    Attributes:
        path: the submodule's name in ``module.named_modules()`` (``""`` for the root).
        module_type: the submodule's class name.
        message: what is wrong.
        fix: how to repair it.
        severity: :class:`Severity`.
    """

    path: str
    module_type: str
    message: str
    fix: str
    severity: Severity

    def __str__(self) -> str:
        where = self.path or "<root>"
        return f"[{self.severity.value}] {where} ({self.module_type}): {self.message} Fix: {self.fix}"


class ModuleValidationError(ValueError):
    """Raised by :func:`assert_valid`; ``.problems`` holds every error found."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = tuple(problems)
        lines = "\n  ".join(str(p) for p in self.problems)
        super().__init__(
            f"assert_valid: the module is not compatible with per-example DP ({len(self.problems)} error(s)):\n  {lines}\n"
            "dpfunc.bridge.fix(module) repairs BatchNorm and InstanceNorm running statistics."
        )


def _fast_supported(m: nn.Module) -> bool:
    try:
        from dpfunc.bridge.fast.rules import rule_for
    except ImportError:  # the fast path is optional
        return isinstance(m, _FAST_TYPES) and type(m).forward in {t.forward for t in _FAST_TYPES}
    return rule_for(m) is not None


def _static_problems(module: nn.Module) -> list[Problem]:
    problems = []
    for path, m in module.named_modules():
        kind = type(m).__name__
        if isinstance(m, _BatchNorm):
            problems.append(
                Problem(
                    path,
                    kind,
                    "BatchNorm normalises each example by statistics of the whole batch (training mode), so one "
                    "example's output depends on the others and per-example clipping no longer bounds its influence; "
                    "its running statistics are a non-private summary of the data.",
                    "replace it by GroupNorm: dpfunc.bridge.fix(module) (or nn.GroupNorm(num_groups, num_channels)).",
                    Severity.ERROR,
                )
            )
            continue
        if isinstance(m, _InstanceNorm) and m.track_running_stats:
            problems.append(
                Problem(
                    path,
                    kind,
                    "InstanceNorm with track_running_stats=True updates running statistics from the data at every "
                    "forward; they escape clipping and noise.",
                    f"use {kind}(..., track_running_stats=False): dpfunc.bridge.fix(module).",
                    Severity.ERROR,
                )
            )
            continue
        own_buffers = [n for n, _ in m.named_buffers(recurse=False)]
        if own_buffers:
            problems.append(
                Problem(
                    path,
                    kind,
                    f"has buffers {own_buffers}; if its forward writes them from the data, that information is not "
                    "private.",
                    "pass example_input= to validate() to check whether the forward changes them; keep buffers constant.",
                    Severity.WARNING,
                )
            )
        own_params = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        if own_params and not _fast_supported(m):
            problems.append(
                Problem(
                    path,
                    kind,
                    f"the fast clipping path has no rule for {kind} (parameters {own_params}); they fall back to vmap.",
                    "nothing to do (correct, at vmap's cost for these parameters); supported: Linear, Conv1d/2d, "
                    "Embedding, LayerNorm, GroupNorm.",
                    Severity.INFO,
                )
            )
    return problems


def _dynamic_problems(module: nn.Module, example_input: Any) -> list[Problem]:
    probe = copy.deepcopy(module).train()
    before = {k: v.detach().clone() for k, v in probe.named_buffers()}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        probe(*args)
    after = dict(probe.named_buffers())
    owners = dict(probe.named_modules())
    problems = []
    for name, old in before.items():
        new = after.get(name)
        if new is None or new.shape != old.shape or not torch.equal(new, old):
            path = name.rpartition(".")[0]
            problems.append(
                Problem(
                    path,
                    type(owners.get(path, probe)).__name__,
                    f"its forward changed buffer {name!r}: information from the data is written outside the gradient, "
                    "escaping clipping and noise.",
                    "make the buffer constant (or compute it from public data only); see dpfunc.bridge.fix for norms.",
                    Severity.ERROR,
                )
            )
    return problems


def validate(module: nn.Module, *, example_input: Any = None) -> list[Problem]:
    """List the problems of ``module`` for per-example DP training (see the module docstring).

    Args:
        module: the model (not modified).
        example_input: optional input (a tensor, or a tuple of positional arguments). If given, a deep
            copy of the module runs one forward in training mode and every buffer it changes is an error.

    Returns:
        A list of :class:`Problem`, errors first, in module order within each severity.

    Example:
        >>> [p.severity for p in validate(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))]
        [<Severity.ERROR: 'error'>]
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"validate: module must be an nn.Module, got {type(module).__name__}")
    problems = _static_problems(module)
    if example_input is not None:
        found = _dynamic_problems(module, example_input)
        known = {(p.path, p.severity) for p in problems}
        problems += [p for p in found if (p.path, Severity.ERROR) not in known]
        # every buffer was checked: a changed one is now an error, an unchanged one is fine
        problems = [p for p in problems if p.severity is not Severity.WARNING]
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    return sorted(problems, key=lambda p: order[p.severity])


def assert_valid(module: nn.Module, *, example_input: Any = None, strict: bool = False) -> list[Problem]:
    """Raise :class:`ModuleValidationError` listing every error (and warning, if ``strict``).

    Returns:
        The remaining (non-raising) problems, so callers can log warnings and infos.
    """
    problems = validate(module, example_input=example_input)
    bad = {Severity.ERROR, Severity.WARNING} if strict else {Severity.ERROR}
    errors = [p for p in problems if p.severity in bad]
    if errors:
        raise ModuleValidationError(errors)
    return problems
