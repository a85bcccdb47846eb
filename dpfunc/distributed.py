"""Data-parallel DP-SGD across processes, GPUs and machines on ``torch.distributed``.

One step on ``W`` ranks (processes; one per GPU on a GPU machine)::

    idx    = poisson_sample(sampling_key.fold_in(t), n, q)      # SAME batch on every rank
    mine   = rank_slice(idx, rank, W)                           # balanced, disjoint, covering
    c_r    = engine(params, mine)                               # clipped sum of this rank's slice
    c      = all_reduce(c_r, SUM)                               # = Σ over the whole Poisson batch
    ĝ      = (c + N(0, σ²C²; noise_key(t))) / (q·n)             # SAME noise on every rank
    params = optimizer(params, ĝ)                               # identical on every rank

Formal guarantees:
    *Exactly the single-process mechanism.* Every rank draws the same Poisson batch from the shared
    sampling key, and :func:`rank_slice` partitions it: each sampled index is in exactly one rank's
    slice. Clipping is per example, so the sum over ranks of the per-rank clipped sums is the
    clipped sum of the whole batch (up to floating-point summation order). The all-reduce hands
    every rank the same sum ``c``. The noise is drawn *after* the reduction, by the transform
    (:func:`~dpfunc.dp_aggregate`), from the shared noise key and the shared step counter, so every
    rank draws the same vector ``z`` and releases the same ``(c + z) / (q·n)``. This is one draw
    of the Gaussian mechanism on one sum of sensitivity ``C``: the noise is added exactly once (it
    is never all-reduced, which would add ``W`` independent copies or ``W`` times the same one),
    with no extra communication. The per-rank ledgers record the same ``(σ, q)`` steps and are
    therefore identical, and ε is the single-process ε.

    *Identical replicas.* The all-reduce result is the same on every rank, the noise and the
    optimizer are deterministic functions of it and of the replicated state, so the parameters
    stay identical on every rank without a broadcast (the tests check this bit for bit on gloo).

    *Edge cases.* An empty Poisson batch, or a rank whose slice is empty (batch smaller than
    ``W``), contributes an exact zero to the sum (masked padding rows contribute exactly 0, see
    :func:`~dpfunc.pad_batch`); the release is then pure noise, as in one process. A crashed rank
    makes the others fail in their next collective (connection error, or the process group's
    timeout), never hang forever.

Checkpoints hold only world-independent state (parameters, optimizer state with its ledger), are
written by rank 0 atomically (:func:`save_on_rank0`), and resume on any world size.

Launch with ``torchrun`` (``torchrun --nproc-per-node 2 -m dpfunc train ...``) or
:func:`launch_local`; :func:`init_world` reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and picks the backend from the device: gloo on
CPU, NCCL on CUDA (:func:`backend_for`).

References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD). Opacus' ``DPDDP``
    (Yousefpour et al. 2021) adds noise on one rank after DDP's all-reduce; here every rank draws the
    same noise from the shared key instead, so no rank is special.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from dpfunc._tree import Params
from dpfunc.clipping import ClippedSum
from dpfunc.private import check_budget, find_dp_state
from dpfunc.step import EngineOutput, GradEngine, StepMetrics, _default_engine
from dpfunc.transforms import GradientTransformation, apply_updates

__all__ = [
    "World", "backend_for", "init_world", "single_process", "slice_bounds", "rank_slice", "rank_batch_size",
    "all_reduce_clipped_sum", "check_replicas", "shared_entropy", "make_distributed_step", "sync", "save_on_rank0", "launch_local", "free_port",
    "run_and_exit",
]


class World(NamedTuple):
    """Where this process stands: its ``rank`` in ``0..size-1`` and the process group (None when
    ``size == 1``: a one-process world runs no collective at all)."""

    rank: int
    size: int
    group: Any = None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes checkpoints and logs)."""
        return self.rank == 0


def single_process() -> World:
    """The one-process world (no process group): distributed code then runs as plain code."""
    return World(0, 1, None)


def backend_for(device: torch.device | str | None) -> str:
    """The collective backend for ``device``: ``"nccl"`` for CUDA, ``"gloo"`` for CPU.

    Raises:
        ValueError: another device type (no backend is known for it here).
    """
    kind = torch.device(device if device is not None else "cpu").type
    backends = {"cpu": "gloo", "cuda": "nccl"}
    if kind not in backends:
        raise ValueError(f"backend_for: device must be a CPU or CUDA device, got {device!r}")
    return backends[kind]


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"init_world: the environment variable {name} is not set; launch with torchrun or "
                             f"dpfunc.distributed.launch_local (they set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"init_world: {name} must be an integer, got {value!r}") from None


def init_world(device: torch.device | str | None = None, *, timeout_s: float = 120.0) -> World:
    """Join the process group that ``torchrun`` (or :func:`launch_local`) set up; idempotent.

    Without ``WORLD_SIZE`` in the environment, or with ``WORLD_SIZE=1``, returns
    :func:`single_process` and initialises nothing. On CUDA, selects the GPU ``LOCAL_RANK``.

    Args:
        device: the training device; decides the backend (:func:`backend_for`).
        timeout_s: a collective that waits longer than this (a crashed or stuck peer) raises
            instead of hanging.

    Returns:
        The :class:`World` of this process.
    """
    if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and 0 < timeout_s < math.inf):
        raise ValueError(f"init_world: timeout_s must be a finite number > 0, got {timeout_s!r}")
    size = _env_int("WORLD_SIZE", 1)
    if size == 1:
        return single_process()
    if size < 1:
        raise ValueError(f"init_world: WORLD_SIZE must be >= 1, got {size}")
    rank = _env_int("RANK")
    if not 0 <= rank < size:
        raise ValueError(f"init_world: RANK must be in [0, {size}), got {rank}")
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


def _is_rank_process() -> bool:
    """True inside a process group, or in a process launched as one of several ranks (even after
    ``destroy_process_group``: gloo's threads can outlive the group object)."""
    if dist.is_available() and dist.is_initialized():
        return True
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def run_and_exit(main: Callable[[], int | None]) -> None:
    """Run a rank's ``main()`` and exit with its code — a nonzero one, never SIGABRT, when it fails.

    A process that leaves the interpreter with a live gloo process group can die by SIGABRT during
    teardown ("terminate called without an active exception", no Python frame), most often when a rank
    raises while its peer exits at the same moment; its own exit code (and a launcher's ``> 0`` check)
    is lost. Destroying the group first does not avoid it (our CI saw a rank that had called
    ``destroy_process_group`` die so). So, in a process that a launcher started as one of several ranks
    (``WORLD_SIZE > 1``) or that holds a process group, this flushes stdout/stderr and leaves by
    ``os._exit`` (the traceback of an exception printed first, exit code 1, as Python's own), whether
    or not the group was destroyed; in a single process it is ``sys.exit(main())``. Files are closed by then: everything
    dpfunc writes is written atomically and closed before ``main`` returns. Upstream, the cause is known:
    gloo's worker threads can still hold work objects with tensors when the interpreter finalises, and
    freeing them then needs the GIL (pytorch/pytorch pull request 179291 proposed an ``atexit``
    ``destroy_process_group``; it was abandoned, and our own measurement above says that alone is not
    enough).

    Example (the last line of a training script started by ``torchrun``)::

        if __name__ == "__main__":
            run_and_exit(main)
    """
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    except BaseException:
        if not _is_rank_process():
            raise
        traceback.print_exc()
        code = 1
    if not _is_rank_process():
        sys.exit(code)
    if not isinstance(code, int):  # sys.exit semantics: None is 0, any other object is printed and 1
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def slice_bounds(batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each rank's contiguous slice of a batch of ``batch_size`` rows.

    Balanced: slice sizes differ by at most one (the first ``batch_size % world_size`` ranks get one
    more). The slices are disjoint, in rank order, and cover ``range(batch_size)``.

    Example:
        >>> slice_bounds(5, 2)
        [(0, 3), (3, 5)]
    """
    fn = "slice_bounds"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"{fn}: batch_size must be an int >= 0, got {batch_size!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{fn}: world_size must be an int >= 1, got {world_size!r}")
    base, extra = divmod(batch_size, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def rank_slice(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's share of the shared Poisson indices (see :func:`slice_bounds`).

    Args:
        indices: ``(b,)`` the batch's example indices, the same on every rank.
        rank: in ``0..world_size-1``.
        world_size: number of ranks.

    Returns:
        ``(b_r,)`` with ``b_r ∈ {⌊b/W⌋, ⌈b/W⌉}``; concatenated over ranks in order they give back
        ``indices``. A rank reads only the examples of its slice.

    Example:
        >>> rank_slice(torch.tensor([2, 5, 7, 11, 13]), 1, 2)
        tensor([11, 13])
    """
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
        raise ValueError(f"rank_slice: indices must be a 1-d tensor, got {getattr(indices, 'shape', type(indices).__name__)}")
    bounds = slice_bounds(int(indices.shape[0]), world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank_slice: rank must be an int in [0, {world_size}), got {rank!r}")
    start, stop = bounds[rank]
    return indices[start:stop]


def rank_batch_size(padded_batch_size: int, world_size: int) -> int:
    """The fixed per-rank shape for batches padded to ``padded_batch_size`` in one process:
    ``⌈padded / W⌉``, the largest slice :func:`slice_bounds` gives a batch of that size."""
    if isinstance(padded_batch_size, bool) or not isinstance(padded_batch_size, int) or padded_batch_size < 1:
        raise ValueError(f"rank_batch_size: padded_batch_size must be an int >= 1, got {padded_batch_size!r}")
    return max(hi - lo for lo, hi in slice_bounds(padded_batch_size, world_size))


def _all_reduce_sum(t: torch.Tensor, world: World, what: str) -> None:
    """In-place SUM all-reduce whose failure (a crashed peer, the group's timeout) names what was reduced."""
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=world.group)
    except RuntimeError as e:  # gloo/NCCL raise RuntimeError (DistBackendError is one)
        raise RuntimeError(f"dpfunc.distributed: rank {world.rank} of {world.size} could not all-reduce {what}: another "
                           f"rank crashed, stopped or timed out (see its log); this rank stops too. Cause: {e}") from e


def all_reduce_clipped_sum(clipped: ClippedSum, world: World) -> ClippedSum:
    """Sum the clipped sums (and the counts of real examples) of all ranks, in place of none.

    One all-reduce per dtype: the gradients are flattened into one buffer (fewer, larger messages).
    The per-example ``norms``/``group_norms`` stay local (they are diagnostics of this rank's rows).
    The sensitivity is unchanged: the reduced sum is the clipped sum of the whole batch. Inputs are
    not modified. A one-process ``world`` returns ``clipped`` itself.

    Communication per step: the model's size in gradient bytes (plus 8 bytes for the count).
    """
    if world.size == 1:
        return clipped
    names = list(clipped.grads)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in names:
        by_dtype.setdefault(clipped.grads[name].dtype, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for members in by_dtype.values():
        flat = torch.cat([clipped.grads[k].reshape(-1) for k in members])  # a new buffer: inputs untouched
        _all_reduce_sum(flat, world, "the clipped gradient sum")
        offset = 0
        for k in members:
            numel = clipped.grads[k].numel()
            out[k] = flat[offset : offset + numel].view_as(clipped.grads[k])
            offset += numel
    device = next(iter(clipped.grads.values())).device if clipped.grads else None
    count = torch.as_tensor(clipped.num_real_rows, device=device).detach().to(torch.int64).clone().reshape(())
    _all_reduce_sum(count, world, "the example count")
    return clipped._replace(grads={k: out[k] for k in names}, num_real_rows=count)


def _metric_sums(out: EngineOutput | None, mask: torch.Tensor | None, world: World,
                 device: torch.device | None = None) -> tuple[StepMetrics, torch.Tensor]:
    """:class:`~dpfunc.StepMetrics` of the whole batch from all-reduced sums (one small all-reduce), and
    the number of ranks that failed this step (a 0-d tensor; ``out=None`` is this rank failing: it
    contributes nothing but its failure flag, so the others learn of it at once instead of waiting
    for the process group's timeout)."""
    dtype = torch.float64  # sums of counts and losses: exact counts up to 2**53
    if out is None:
        sums = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=dtype, device=device)
        flat = True
    else:
        clipped, losses = out.grads, out.losses.detach()
        device = losses.device
        real = mask.to(torch.bool) if mask is not None else torch.ones(losses.shape, dtype=torch.bool, device=device)
        norms = clipped.norms.detach().to(dtype)
        flat = set(clipped.group_norms) == {""}
        clipped_count = (real & (norms > clipped.sensitivity)).sum().to(dtype) if flat else torch.zeros((), dtype=dtype, device=device)
        sums = torch.stack([
            torch.where(real, losses.to(dtype), 0).sum(), real.sum().to(dtype), clipped_count, torch.where(real, norms, 0).sum(),
            torch.zeros((), dtype=dtype, device=device),
        ])
    if world.size > 1:
        _all_reduce_sum(sums, world, "the step metrics")
    n = sums[1]  # 0 / 0 = nan for an empty batch, as in one process
    frac = sums[2] / n if flat else torch.full((), float("nan"), dtype=dtype, device=device)
    return StepMetrics(sums[0] / n, n.to(torch.int64), frac, sums[3] / n), sums[4]


def shared_entropy(world: World) -> Callable[[], bytes]:
    """``entropy()`` → 48 bytes of rank 0's ``os.urandom``, the same on every rank (one 48-byte broadcast).

    For secure mode on several ranks (``dp_aggregate(..., secure=True, secure_entropy=shared_entropy(world))``):
    every rank then keys the step's ChaCha20 stream with the same secret bytes and draws the same discrete
    Gaussian noise, so the noise is added once, as with the shared key of the default path. The bytes never
    leave the training processes (the trust boundary of the gradients themselves); a one-process world
    returns ``os.urandom`` itself.

    Example:
        >>> entropy = shared_entropy(single_process())
        >>> len(entropy()), entropy() != entropy()   # 48 fresh bytes per call
        (48, True)
    """
    if world.size == 1:
        return lambda: os.urandom(48)

    def entropy() -> bytes:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(world.group) == "nccl" else torch.device("cpu")
        buf = torch.zeros(48, dtype=torch.uint8, device=device)
        if world.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(os.urandom(48)), dtype=torch.uint8))
        try:
            dist.broadcast(buf, src=0, group=world.group)
        except RuntimeError as e:
            raise RuntimeError(f"dpfunc.distributed: rank {world.rank} of {world.size} could not receive the secure-noise "
                               f"key: another rank crashed, stopped or timed out (see its log). Cause: {e}") from e
        return bytes(buf.cpu().tolist())

    return entropy


def check_replicas(updates: Params, world: World) -> None:
    """Raise if the ranks' updates differ (one 2-element all-reduce and one host read).

    The updates are a deterministic function of the all-reduced sum and the shared key, so they are
    equal bit for bit on every rank; they differ only when the noise was NOT drawn from the shared
    key (e.g. ``dp_aggregate(..., secure=True)``, whose noise comes from ``os.urandom`` on each rank:
    the ranks would release different noisy gradients and drift apart).
    """
    if world.size == 1:
        return
    ref = next(iter(updates.values())) if updates else torch.zeros(())
    s = sum((u.detach().to(torch.float64) * (1.0 + i)).sum() for i, u in enumerate(updates.values())) if updates else ref.new_zeros((), dtype=torch.float64)
    s = torch.nan_to_num(torch.as_tensor(s, dtype=torch.float64, device=ref.device), nan=0.0)
    both = torch.stack([s, -s])
    try:
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=world.group)
    except RuntimeError as e:
        raise RuntimeError(f"dpfunc.distributed: rank {world.rank} of {world.size} could not compare the replicas: another "
                           f"rank crashed, stopped or timed out (see its log). Cause: {e}") from e
    if bool(both[0] != -both[1]):
        raise RuntimeError(
            f"make_distributed_step: the ranks' updates differ (rank {world.rank} of {world.size}); the noise must be drawn "
            f"from the shared key (dp_aggregate's default). Secure noise from each rank's own os.urandom differs per rank: "
            f"pass dp_aggregate(..., secure=True, secure_entropy=shared_entropy(world))")


def make_distributed_step(
    loss_fn: Callable[..., torch.Tensor] | None,
    tx: GradientTransformation,
    *,
    world: World,
    engine: GradEngine | None = None,
    chunk_size: int | None = None,
    check: bool = True,
) -> Callable[..., tuple[Params, Any, StepMetrics]]:
    """:func:`~dpfunc.make_step` for data-parallel training: each rank passes ITS slice of the shared batch.

    Args:
        loss_fn: the loss of ONE example (unused with ``engine``), as for :func:`~dpfunc.make_step`.
        tx: a transform that begins with :func:`~dpfunc.dp_aggregate` (built with the SAME noise key
            on every rank — :func:`~dpfunc.run_keys` of the shared seed).
        world: from :func:`init_world` (a one-process world gives :func:`~dpfunc.make_step`'s results).
        engine: computes the clipped sum of the slice (``vmap_engine`` or the bridge's ``fast_engine``).
        check: compare the ranks' updates at every step (:func:`check_replicas`: one tiny all-reduce and
            one host read per step) and raise if they differ; and when one rank's own work fails (its
            engine or batch raises), make every other rank raise at once instead of waiting for the
            process group's timeout (one more host read of the metrics all-reduce's failure count).
            False skips both (no host read: a GPU pipeline never waits), for a ``tx`` known to draw
            its noise from the shared key; a lone failure then reaches the others as a timeout.

    Returns:
        ``step(params, opt_state, batch, mask=None, buffers=None) -> (params, opt_state, metrics)``
        with ``batch`` this rank's slice (:func:`rank_slice`), padded to :func:`rank_batch_size`
        rows with ``mask`` if fixed shapes are wanted. ``metrics`` describe the WHOLE batch (all
        ranks); the returned params and state are identical on every rank (see the module docstring
        for why, and why the noise is added exactly once).

    Raises:
        As :func:`~dpfunc.make_step`; a budget refusal happens on every rank at the same step (the
        ledgers are identical), before any collective, so no rank is left waiting.

    Example:
        >>> loss_fn = lambda p, b, x: (p["w"] * x).sum()
        >>> tx = dpsgd(0.1, noise_multiplier=0.0, max_grad_norm=1.0, sampling_rate=0.5, num_examples=4, key=Key(0))
        >>> step = make_distributed_step(loss_fn, tx, world=single_process())
        >>> params, state, m = step({"w": torch.zeros(2)}, tx.init({"w": torch.zeros(2)}), (torch.ones(2, 2),))
        >>> int(m.batch_size)
        2
    """
    if not isinstance(world, World):
        raise TypeError(f"make_distributed_step: world must be a dpfunc.distributed.World (from init_world), got {type(world).__name__}")
    default = None
    if engine is None:
        if loss_fn is None:
            raise ValueError("make_distributed_step: give loss_fn or engine")
        default = _default_engine(loss_fn, chunk_size)

    def step(params, opt_state, batch, mask=None, buffers=None):
        dp_state = find_dp_state(opt_state)
        if dp_state is None:
            raise ValueError("make_distributed_step: tx must contain dp_aggregate (use dpsgd/dpadam or chain(dp_aggregate(...), ...))")
        check_budget(dp_state)  # identical ledgers: every rank refuses the same step, before any collective
        out, failure = None, None
        try:  # this rank's own work: an error here is announced to the others in the metrics all-reduce
            if not isinstance(batch, (tuple, list)) or not batch:
                raise ValueError(f"make_distributed_step: batch must be a non-empty tuple of tensors, got {type(batch).__name__}")
            if mask is not None and tuple(mask.shape) != (batch[0].shape[0],):
                raise ValueError(f"make_distributed_step: mask must have shape ({batch[0].shape[0]},), got {tuple(mask.shape)}")
            run = engine if engine is not None else default(dp_state.clipping)
            out = run(params, buffers if buffers is not None else {}, tuple(batch), mask)
        except Exception as e:
            if world.size == 1 or not check:
                raise
            failure = e
        device = next(iter(params.values())).device if params else None
        metrics, failed = _metric_sums(out, mask, world, device)
        if failure is not None:
            raise failure
        if check and world.size > 1 and bool(failed > 0):  # one host read (check=True reads one per step anyway)
            raise RuntimeError(f"make_distributed_step: {int(failed)} other rank(s) of {world.size} failed in this step "
                               f"(their logs say why); rank {world.rank} stops too, with nothing applied")
        with torch.no_grad():
            total = all_reduce_clipped_sum(out.grads, world)
            updates, opt_state = tx.update(total, opt_state, params)  # the noise: after the reduction, once
            if check:
                check_replicas(updates, world)
            new_params = apply_updates(params, updates)
        return new_params, opt_state, metrics

    return step


def sync(world: World) -> None:
    """A barrier across the ranks (nothing in a one-process world)."""
    if world.size > 1:
        dist.barrier(group=world.group)


def save_on_rank0(path: str | os.PathLike, state: Any, world: World) -> None:
    """Rank 0 writes ``state`` atomically (:func:`dpfunc.bridge.checkpoint.save_checkpoint`); the
    others wait at a barrier, so after the call every rank may read the file. Since ``state`` is
    identical on every rank, the checkpoint does not depend on the world size and resumes on any."""
    from dpfunc.bridge.checkpoint import save_checkpoint

    if world.is_main:
        save_checkpoint(path, state)
    if world.size > 1:
        dist.barrier(group=world.group)


def launch_train_ranks(args: Any, add_parser: Callable, run_dir: str | os.PathLike) -> int:
    """``dpfunc train --nproc N``: run the same command as N local ranks (:func:`launch_local`).

    The children get the parent's flags (rebuilt from the parsed ``args`` and the train parser that
    ``add_parser`` declares), without ``--nproc`` and with the run folder the parent resolved (so all
    ranks agree on it). Returns 0 if every rank succeeded, else the first failing rank's code.
    """
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub)
    argv = [sys.executable, "-m", "dpfunc", "train"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc", "run_dir", "dry_run"):
            continue
        value = getattr(args, action.dest, action.default)
        if isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif value is not None and value != action.default:
            argv += [action.option_strings[0], str(value)]
    argv += ["--run-dir", os.fspath(run_dir)]
    print(f"dpfunc train: {args.nproc} processes (gloo on localhost): {' '.join(argv[1:])}", flush=True)
    codes = launch_local(args.nproc, argv, quiet_ranks=True)
    failed = [(r, c) for r, c in enumerate(codes) if c != 0]
    if failed:
        print(f"dpfunc train: rank(s) failed (rank, exit code): {failed}", file=sys.stderr)
        return failed[0][1] if failed[0][1] > 0 else 1
    return 0


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(
    nproc: int,
    argv: Sequence[str],
    *,
    timeout_s: float | None = None,
    grace_s: float = 30.0,
    log_dir: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    quiet_ranks: bool = False,
) -> list[int]:
    """Run ``argv`` as ``nproc`` local ranks (``torchrun --standalone`` in miniature) and wait.

    Each process gets ``RANK``/``LOCAL_RANK``, ``WORLD_SIZE``/``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``
    and a free ``MASTER_PORT``; each runs in its own session (process group), which is killed on the
    way out, whatever happens. When a rank fails, the others get ``grace_s`` seconds to fail on their
    own (their next collective raises) before they are killed. Unless ``OMP_NUM_THREADS`` is set, each
    rank gets ``cpu_count // nproc`` threads (torchrun gives 1), so the ranks do not oversubscribe the cores.

    Args:
        nproc: number of ranks (>= 1).
        argv: the command, e.g. ``[sys.executable, "-m", "dpfunc", "train", ...]``.
        timeout_s: kill every rank after this long (None: no limit).
        grace_s: see above.
        log_dir: if given, rank ``r`` writes ``rank{r}.out`` / ``rank{r}.err`` there.
        env: extra environment variables.
        quiet_ranks: discard the standard output of ranks other than 0 (their standard error is kept).

    Returns:
        The exit code of each rank (negative: killed by that signal).
    """
    import signal

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"launch_local: nproc must be an int >= 1, got {nproc!r}")
    if not argv:
        raise ValueError("launch_local: argv is empty")
    port = free_port()
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for r in range(nproc):
            e = dict(os.environ, **(env or {}))
            e.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the cores, shared out
            e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                     LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            out = subprocess.DEVNULL if quiet_ranks and r > 0 else None
            err = None
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                out = open(Path(log_dir) / f"rank{r}.out", "w")
                err = open(Path(log_dir) / f"rank{r}.err", "w")
                files += [out, err]
            procs.append(subprocess.Popen(list(argv), env=e, stdout=out, stderr=err, start_new_session=True))
        start, failed_at = time.monotonic(), None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if (timeout_s is not None and now - start > timeout_s) or (failed_at is not None and now - failed_at > grace_s):
                break
            time.sleep(0.05)
        return [p.returncode if p.poll() is not None else -signal.SIGKILL for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for f in files:
            f.close()
