"""Data loaders for private training: Poisson batches from an explicit key, split into micro-batches.

Formal guarantees:
    :class:`PoissonBatchSampler` includes each example of a map-style dataset in logical batch ``t``
    independently with probability ``sampling_rate``, drawn by :func:`dpfunc.poisson_sample` from
    ``key.fold_in(t)``: the sampling the accountants assume. Batch ``t`` depends only on ``(key, t)``, so
    resuming at position ``t`` reproduces the run. A logical batch larger than
    ``max_physical_batch_size`` is yielded as several physical micro-batches (in order; none dropped);
    the private optimizer adds noise once per logical batch.

Edge cases:

    ===========================  ============================================================
    empty logical batch          yielded as ONE empty micro-batch (tensors with 0 rows), so the
                                 step still happens and releases pure noise, as accounted
    epoch                        ``steps_per_epoch`` logical batches; iteration resumes at the
                                 current position and runs to the end of its epoch
    ===========================  ============================================================
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from dpfunc.keys import Key
from dpfunc.sampling import check_sampling_rate, poisson_sample

__all__ = ["PoissonBatchSampler", "LogicalBatchPlan", "poisson_loader"]


class LogicalBatchPlan:
    """The queue that tells the private optimizer where logical batches end.

    The sampler pushes, per logical batch, how many micro-batches it was split into; the optimizer
    consumes one entry per ``step()``. The queue is FIFO, so it stays right when a ``DataLoader``
    prefetches; a new iteration (``__iter__``) discards what the previous one left unconsumed.
    """

    def __init__(self) -> None:
        self._queue: collections.deque[list[int]] = collections.deque()  # [logical index, micro-batches left]
        self.generation = 0
        self._consumed_in_head = 0

    def push(self, index: int, num_micro: int) -> None:
        self._queue.append([index, num_micro])

    def reset(self) -> None:
        self._queue.clear()
        self._consumed_in_head = 0
        self.generation += 1

    def consume(self) -> bool:
        """Account one micro-batch; True if it completed a logical batch (or nothing is planned)."""
        if not self._queue:
            return True
        head = self._queue[0]
        head[1] -= 1
        self._consumed_in_head += 1
        if head[1] <= 0:
            self._queue.popleft()
            self._consumed_in_head = 0
            return True
        return False

    @property
    def mid_batch(self) -> bool:
        return self._consumed_in_head > 0

    @property
    def unconsumed(self) -> int:
        """Logical batches drawn by the sampler but not yet stepped on (prefetched)."""
        return len(self._queue)


def _chunks(indices: list[int], size: int | None) -> list[list[int]]:
    if size is None or len(indices) <= size:
        return [indices]
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class PoissonBatchSampler:
    """A ``batch_sampler`` of Poisson batches from an explicit key (see the module docstring).

    Args:
        num_examples: dataset size ``n``.
        sampling_rate: ``q`` ∈ (0, 1].
        steps_per_epoch: logical batches per epoch (≥ 1).
        key: the sampling key; logical batch ``t`` is ``poisson_sample(key.fold_in(t), n, q)``.
        max_physical_batch_size: split logical batches into micro-batches of at most this size.
        plan: the :class:`LogicalBatchPlan` shared with the private optimizer.
        rank, world_size: data-parallel training (:mod:`dpfunc.distributed`): every rank draws the SAME
            Poisson batch from ``key`` and yields only its balanced slice
            (:func:`~dpfunc.distributed.rank_slice`); default one process.
    """

    def __init__(
        self,
        num_examples: int,
        sampling_rate: float,
        steps_per_epoch: int,
        *,
        key: Key,
        max_physical_batch_size: int | None = None,
        plan: LogicalBatchPlan | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        fn = "PoissonBatchSampler"
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"{fn}: world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"{fn}: rank must be an int in [0, {world_size}), got {rank!r}")
        self.rank, self.world_size = rank, world_size
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise ValueError(f"{fn}: num_examples must be an int >= 1, got {num_examples!r}")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"{fn}: steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
        _check_physical(fn, max_physical_batch_size)
        if not isinstance(key, Key):
            raise TypeError(f"{fn}: key must be a dpfunc.Key, got {type(key).__name__}")
        self.num_examples = num_examples
        self.sampling_rate = check_sampling_rate(fn, sampling_rate)
        self.steps_per_epoch = steps_per_epoch
        self.key = key
        self.max_physical_batch_size = max_physical_batch_size
        self.plan = plan if plan is not None else LogicalBatchPlan()
        self.position = 0  # logical batches drawn so far (the next one is batch `position`)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        self.plan.reset()
        end = (self.position // self.steps_per_epoch + 1) * self.steps_per_epoch
        while self.position < end:
            t = self.position
            idx = poisson_sample(self.key.fold_in(t), self.num_examples, self.sampling_rate)
            if self.world_size > 1:
                from dpfunc.distributed import rank_slice

                idx = rank_slice(idx, self.rank, self.world_size)
            idx = idx.tolist()
            parts = _chunks(idx, self.max_physical_batch_size)
            self.plan.push(t, len(parts))
            self.position = t + 1
            yield from parts


class _ChunkedBatchSampler:
    """Split the batches of an ordinary ``batch_sampler`` into micro-batches (``poisson_sampling=False``)."""

    def __init__(self, batch_sampler: Iterable[list[int]], max_physical_batch_size: int | None, plan: LogicalBatchPlan):
        self.batch_sampler = batch_sampler
        self.max_physical_batch_size = max_physical_batch_size
        self.plan = plan
        self.position = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        self.plan.reset()
        for batch in self.batch_sampler:
            parts = _chunks(list(batch), self.max_physical_batch_size)
            self.plan.push(self.position, len(parts))
            self.position += 1
            yield from parts


class _EmptyAwareCollate:
    """``collate_fn`` that turns an empty batch into tensors with 0 rows (shapes from example 0)."""

    def __init__(self, collate_fn, dataset: Dataset):
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) > 0:
            return self.collate_fn(batch)
        # Example 0 is read for its shapes and dtypes only; none of its values leave this function.
        template = self.collate_fn([self.dataset[0]])
        return _empty_like(template)


def _empty_like(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:0]
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_empty_like(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_empty_like(v) for v in x)
    if isinstance(x, dict):
        return {k: _empty_like(v) for k, v in x.items()}
    return x


def _check_physical(fn: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{fn}: max_physical_batch_size must be None or an int >= 1, got {value!r}")


def _loader_kwargs(data_loader: DataLoader) -> dict[str, Any]:
    kw = dict(
        num_workers=data_loader.num_workers,
        pin_memory=data_loader.pin_memory,
        timeout=data_loader.timeout,
        worker_init_fn=data_loader.worker_init_fn,
        multiprocessing_context=data_loader.multiprocessing_context,
        persistent_workers=data_loader.persistent_workers,
    )
    if data_loader.num_workers > 0:
        kw["prefetch_factor"] = data_loader.prefetch_factor
    return kw


def poisson_loader(
    data_loader: DataLoader,
    *,
    key: Key,
    poisson_sampling: bool = True,
    max_physical_batch_size: int | None = None,
    plan: LogicalBatchPlan | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, float, int]:
    """Rebuild ``data_loader`` to draw Poisson batches (Opacus' ``DPDataLoader.from_data_loader``).

    The sampling rate is ``q = 1 / len(data_loader)`` and an epoch has ``len(data_loader)`` logical
    batches, so the expected batch size is about the original ``batch_size`` (as in Opacus). Workers,
    pinning and ``collate_fn`` are kept; empty batches come out as 0-row tensors. With ``world_size > 1``
    each rank's loader yields its slice of the shared Poisson batch (see :class:`PoissonBatchSampler`).

    Returns:
        ``(loader, sampling_rate, steps_per_epoch)``.
    """
    fn = "poisson_loader"
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"{fn}: data_loader must be a torch.utils.data.DataLoader, got {type(data_loader).__name__}")
    dataset = data_loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(f"{fn}: Poisson sampling needs a map-style Dataset with __len__, got {type(dataset).__name__}")
    _check_physical(fn, max_physical_batch_size)
    n = len(dataset)
    steps = len(data_loader)
    if n < 1 or steps < 1:
        raise ValueError(f"{fn}: the dataset is empty (len(dataset)={n}, len(data_loader)={steps})")
    q = 1.0 / steps
    plan = plan if plan is not None else LogicalBatchPlan()
    collate = _EmptyAwareCollate(data_loader.collate_fn or default_collate, dataset)
    if poisson_sampling:
        sampler: Any = PoissonBatchSampler(n, q, steps, key=key, max_physical_batch_size=max_physical_batch_size, plan=plan,
                                           rank=rank, world_size=world_size)
    else:
        if world_size > 1:
            raise ValueError(f"{fn}: data-parallel training needs poisson_sampling=True (every rank must draw the same "
                             f"batch from the shared key), got poisson_sampling=False with world_size={world_size}")
        sampler = _ChunkedBatchSampler(data_loader.batch_sampler, max_physical_batch_size, plan)
    # A generator of our own: DataLoader draws its worker base seed from it, not from the global RNG.
    generator = key.fold_in(1 << 62).generator()
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator, **_loader_kwargs(data_loader))
    return loader, q, steps
