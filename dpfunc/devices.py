"""Where a run computes: the device, batches moved to it, deterministic algorithms, mixed precision.

The functional core already runs on any device: a step computes where its parameters and batch live,
keys make their generators on the tensors' device (:func:`dpfunc.noise.gaussian_noise`), and nothing
in a step reads a tensor back to the host. This module holds the few choices a *driver* makes around
it (every ``dpfunc`` command that computes with a model, ``bench/speed.py``):

* :func:`resolve_device` turns ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a ``torch.device``, with a
  message naming the argument when the device is absent;
* :func:`to_device` moves a host batch to an accelerator through pinned memory with
  ``non_blocking=True`` (the copy overlaps the device's work; the host never waits for it);
  :func:`tree_to_device` does it for every tensor of a state (parameters, optimizer state);
* :func:`set_threads` sets torch's CPU threads (``--threads``);
* :func:`deterministic_algorithms` switches torch's deterministic algorithms on for a block;
* :class:`Precision` and :func:`mixed_precision` run a model's forward (hence its backward) in
  bfloat16 while everything that DP depends on stays in float32.

Formal guarantees:
    None of these choices touches the privacy mechanism. The clipping bound, the noise scale σ·C, the
    normaliser q·n and the ledger are the same on every device, in every precision and with or without
    deterministic algorithms: (ε, δ) is a function of the ledger only. What changes across devices is
    the floating-point arithmetic (summation order, kernels) and the *realisation* of the noise: a key
    seeds a CPU generator (MT19937) on the CPU and a Philox generator on CUDA, so the same key draws
    different (equally distributed) noise on the two. Runs are therefore reproducible on one device
    (with :func:`deterministic_algorithms` on CUDA), not bit-exact across devices.

Why float32 for the DP part under ``Precision.BF16``: bfloat16 keeps 8 significant bits, so each
rounding has a relative error of up to 2^-9 ≈ 0.2%. Norms computed in bf16 could let a "clipped"
gradient exceed C; a clipped sum accumulated in bf16 carries rounding errors of order
``|sum|·2^-9`` that depend on every example, so one example could move the computed sum by more than
C (the sensitivity the accountant assumes); and noise of std σC added to a bf16 sum is rounded to
that sum's grid (spacing ``|sum|·2^-8``), so the released value keeps only a few bits of the noise
and the grid itself depends on the data (the floating-point attack on noise of Mironov 2012 in its
crudest form). In float32 these effects are 2^16 times smaller, as in every float-based DP library.
So autocast covers the model's forward and, through autograd, its backward only; per-example
gradients arrive in the parameters' dtype (float32) and the norms, clip factors, clipped sum, noise
and optimizer update are computed in float32. (The bridge's ``fast_engine`` upcasts the bf16
activations and output gradients it taps to float32 before its norm and sum formulas.)

References:
    I. Mironov, "On Significance of the Least Significant Bits for Differential Privacy", CCS 2012.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> Precision("bf16").dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from dpfunc._validate import check_device_spec, check_int_range

__all__ = ["resolve_device", "available_devices", "describe_device", "to_device", "tree_to_device", "set_threads",
           "Precision", "mixed_precision", "deterministic_algorithms", "CUBLAS_WORKSPACE_CONFIG"]

#: The cuBLAS workspace setting that makes cuBLAS reductions deterministic (NVIDIA's documented value).
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def resolve_device(spec: str | torch.device = "auto", *, fn: str = "resolve_device", name: str = "device") -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine.

    Args:
        spec: ``"auto"`` (the current CUDA device when CUDA is available, else the CPU), ``"cpu"``,
            ``"cuda"`` (the current CUDA device), ``"cuda:N"``, or a ``torch.device`` of those types.
        fn, name: the entry point and argument named in error messages (e.g. ``"dpfunc train"``,
            ``"--device"``).

    Returns:
        A ``torch.device``; a CUDA device always carries its index (``cuda:0``, not ``cuda``).

    Raises:
        ValueError: a string that is none of the above, or a CUDA device this machine does not have
            (no CUDA at all, or an index ≥ the number of GPUs); the message names ``fn``, ``name``, the
            value and what this machine offers.

    Example:
        >>> resolve_device("auto").type in ("cpu", "cuda")
        True
    """
    text = check_device_spec(fn, name, str(spec) if isinstance(spec, torch.device) else spec)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    offer = ", ".join(str(d) for d in available_devices())
    if not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"{fn}: {name} {spec!r} asks for a CUDA device, but this machine has none available "
                         f"(torch {torch.__version__}, {built}); use 'cpu' or 'auto' (this machine offers: {offer})")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if text == "cuda" else int(text.split(":", 1)[1])
    if index >= count:
        raise ValueError(f"{fn}: {name} {spec!r} names CUDA device {index}, but this machine has {count} "
                         f"(cuda:0 … cuda:{count - 1}); this machine offers: {offer}")
    return torch.device("cuda", index)


def available_devices() -> list[torch.device]:
    """The CPU, then every CUDA device of this machine (what the device-parametrised tests run on).

    Example:
        >>> available_devices()[0]
        device(type='cpu')
    """
    cuda = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return [torch.device("cpu"), *cuda]


def describe_device(device: torch.device) -> str:
    """``device`` for logs and metrics files: ``"cpu"`` or ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, without making the host wait.

    * already there: returned as is (no copy);
    * host → CUDA: copied into page-locked (pinned) memory, then sent with ``non_blocking=True``.
      From pageable memory CUDA would first synchronise with the device; from pinned memory the copy
      is queued on the current stream and the host goes on (torch's caching host allocator keeps the
      pinned block alive until the copy has completed, so the source may be dropped at once);
    * anything else: an ordinary ``.to(device)``.

    The values are unchanged; the result lives on ``device``.

    Example:
        >>> x = torch.arange(3)
        >>> to_device(x, torch.device("cpu")) is x
        True
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def tree_to_device(tree: Any, device: torch.device) -> Any:
    """``tree`` with every tensor on ``device`` (:func:`to_device`); containers rebuilt, other leaves kept.

    Walks dicts, lists, tuples, NamedTuples (an optimizer state: ``DPAggregateState``, momentum traces)
    and dataclass instances, rebuilding only the containers that hold a moved tensor; anything else (a
    ``Key``, a ``PrivacyLedger``, numbers) is returned as is, and a tree whose tensors are all on ``device``
    already comes back unchanged (the very same object).

    Example:
        >>> s = {"w": torch.ones(2), "meta": (3, "x")}
        >>> tree_to_device(s, torch.device("cpu"))["w"] is s["w"]
        True
    """
    if isinstance(tree, torch.Tensor):
        return to_device(tree, device)
    if isinstance(tree, dict):
        items = {k: tree_to_device(v, device) for k, v in tree.items()}
        return tree if all(items[k] is v for k, v in tree.items()) else type(tree)(items)
    if isinstance(tree, (list, tuple)):
        items = [tree_to_device(v, device) for v in tree]
        if all(a is b for a, b in zip(items, tree)):
            return tree
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {f.name: tree_to_device(getattr(tree, f.name), device) for f in dataclasses.fields(tree) if f.init}
        if all(changes[k] is getattr(tree, k) for k in changes):
            return tree
        return dataclasses.replace(tree, **changes)
    return tree


def set_threads(threads: int | None, *, fn: str = "set_threads", name: str = "threads") -> int:
    """Set torch's intra-op CPU threads (``torch.set_num_threads``) when ``threads`` is given (``--threads N``).

    ``None`` leaves torch's default (one thread per core, or ``$OMP_NUM_THREADS``). On a loaded or small
    machine fewer threads are often faster: on 2 shared cores, 2 threads measured 7–12× slower than 1.

    Returns:
        The number of threads in effect afterwards.

    Raises:
        ValueError: ``threads`` is not an int ≥ 1 (the message names ``fn`` and ``name``).

    Example:
        >>> n = torch.get_num_threads(); set_threads(1); set_threads(n) == n
        1
        True
    """
    if threads is not None:
        torch.set_num_threads(check_int_range(fn, name, threads, low=1))
    return torch.get_num_threads()


class Precision(enum.Enum):
    """The arithmetic of the model's forward and backward (``--precision``).

    ``FP32``: float32 everywhere. ``BF16``: the forward runs under ``torch.autocast`` with bfloat16
    (matrix products and convolutions in bf16 on CUDA tensor cores and on CPUs that support it), the
    backward follows autograd's casts, and per-example gradients, norms, clipping, the clipped sum,
    the noise and the update stay in float32 (see the module docstring for why).
    """

    FP32 = "fp32"
    BF16 = "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16}[self]


def mixed_precision(apply_fn: Callable[..., torch.Tensor], device: torch.device, precision: Precision) -> Callable[..., torch.Tensor]:
    """``apply_fn`` with its forward under autocast in ``precision``, returning a float32 output.

    Args:
        apply_fn: ``apply_fn(params, buffers, x)`` (e.g. from :func:`dpfunc.bridge.functionalize`); an
            ``apply_fn.module`` attribute is kept, so the bridge's ``fast_engine`` accepts the result.
        device: where the forward runs (selects CPU or CUDA autocast).
        precision: ``Precision.FP32`` returns ``apply_fn`` itself.

    Returns:
        ``apply_fn``-like callable. The parameters stay float32 (autocast casts copies inside each op),
        so gradients with respect to them are float32; the output is cast to float32 so that the loss
        is computed in float32.

    Example:
        >>> f = mixed_precision(lambda p, b, x: x @ p["w"], torch.device("cpu"), Precision.BF16)
        >>> f({"w": torch.ones(2, 2)}, {}, torch.ones(1, 2)).dtype
        torch.float32
    """
    if not isinstance(precision, Precision):
        raise TypeError(f"mixed_precision: precision must be a Precision, got {precision!r}")
    if precision is Precision.FP32:
        return apply_fn

    def forward(params, buffers, *args):
        with torch.autocast(device_type=device.type, dtype=precision.dtype):
            out = apply_fn(params, buffers, *args)
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    if hasattr(apply_fn, "module"):
        forward.module = apply_fn.module
    return forward


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Run a block with torch's deterministic algorithms (``--deterministic``); restores the settings after.

    Sets ``torch.use_deterministic_algorithms(True)`` (an op that has no deterministic implementation
    raises a ``RuntimeError`` naming it, instead of silently varying), turns cuDNN's autotuner off and
    its deterministic mode on, and sets ``CUBLAS_WORKSPACE_CONFIG`` to :data:`CUBLAS_WORKSPACE_CONFIG`
    if the environment does not set it (cuBLAS reads it when torch creates its handle, so set it in the
    environment before the first CUDA matrix product when using the library directly; ``dpfunc train``
    enters this block before it touches the GPU).

    On CUDA without it, the nondeterministic parts of a DP-SGD step are the convolution backward (cuDNN
    may pick algorithms that accumulate with atomics, and ``cudnn.benchmark`` may pick different
    algorithms run to run), split-K cuBLAS reductions, and atomics-based scatter/index-add kernels
    (backward of indexing and embeddings). On CPU these settings change nothing in the step.
    The privacy guarantee does not depend on them: it is a property of the noise distribution and
    the clipping bound, which hold in every rounding order.

    Args:
        enabled: False makes the block a no-op (so drivers can write ``with deterministic_algorithms(cfg.deterministic)``).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"deterministic_algorithms: enabled must be a bool, got {enabled!r}")
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if env_before is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]
        if env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def check_precision(fn: str, name: str, value: Any) -> Precision:
    """A :class:`Precision` or its value (``"fp32"``, ``"bf16"``), returned as the member."""
    from dpfunc._validate import check_enum

    return check_enum(fn, name, value, Precision)
