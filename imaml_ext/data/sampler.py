"""N-way K-shot classification tasks drawn from class-indexed data.

A task draws ``ways`` distinct classes, then ``shots + queries`` distinct
examples of each class.  Label ``j`` of a task is its ``j``-th drawn class;
the classes are drawn in random order, so which class gets which label is a
fresh uniform permutation in every task.  Within the support and the query
set examples are ordered by label, then by draw (``y = [0, 0, …, 1, 1, …]``).

Randomness comes from a ``torch.Generator`` owned by the sampler (seeded by
``seed``); ``state_dict()`` / ``load_state_dict()`` save and restore it for
exact resumption.  :class:`TaskStream` wraps a sampler as an
``IterableDataset`` for ``DataLoader`` workers, each worker drawing from its
own generator seeded by :func:`worker_seed`.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["SeededSampler", "TaskBatch", "TaskSampler", "TaskStream", "derive_seed", "to_float", "worker_seed"]

ArrayLike = Union[torch.Tensor, np.ndarray]


class TaskBatch(NamedTuple):
    """A meta-batch of T tasks; unpacks as ``sx, sy, qx, qy``.

    For classification: ``support_x`` [T, N·K, ...], ``support_y`` int64
    [T, N·K], ``query_x`` [T, N·Q, ...], ``query_y`` int64 [T, N·Q].
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images as floating point: uint8 becomes ``x / 255`` in [0, 1]; floating
    input is cast to ``dtype`` unchanged in value."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} is not a floating-point dtype")
    if x.dtype == torch.uint8:
        return x.to(dtype) / 255
    if x.dtype.is_floating_point:
        return x.to(dtype)
    raise TypeError(f"images of dtype {x.dtype}: give uint8 (0..255) or floating-point data")


def derive_seed(seed: int, stream: int) -> int:
    """A 63-bit seed for stream ``stream`` of ``seed``: distinct per stream,
    the same on every platform (NumPy ``SeedSequence``)."""
    state = np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def worker_seed(seed: int, worker_id: int) -> int:
    """The seed of worker ``worker_id`` of a sampler seeded ``seed`` (:func:`derive_seed`)."""
    return derive_seed(seed, worker_id)


class SeededSampler:
    """Owns the ``torch.Generator`` of a sampler and its save/restore."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> Dict[str, Any]:
        """The seed and the generator state; restoring it replays the same tasks."""
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


class TaskSampler(SeededSampler):
    """Draws N-way K-shot tasks with Q queries per class.

    Args:
        data: [C, M, ...] tensor or array (C classes of M examples), or a
            sequence of C per-class [M_c, ...] tensors or arrays with the same
            trailing shape.  uint8 data are images in 0..255 (see
            :func:`to_float`).  It stays where it is (CPU or GPU); examples are
            gathered there.
        ways: N, classes per task (≤ C).
        shots: K, support examples per class (≥ 1).
        queries: Q, query examples per class (≥ 0); every class needs K + Q examples.
        seed: seed of the sampler's generator.
        device: device of the returned tensors (default: the data's).
        dtype: floating dtype of the returned inputs.

    Example::

        sampler = TaskSampler(Omniglot(subset="train").images, ways=5, shots=1, queries=15)
        sx, sy, qx, qy = sampler.sample(meta_batch=32)  # sx [32, 5, 1, 28, 28] float32
    """

    def __init__(self, data: Union[ArrayLike, Sequence[ArrayLike]], ways: int, shots: int,
                 queries: int, *, seed: int = 0, device: Optional[Union[str, torch.device]] = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__(seed)
        if isinstance(data, (torch.Tensor, np.ndarray)):
            data = torch.as_tensor(data)
            if data.ndim < 2:
                raise ValueError(f"data of shape {tuple(data.shape)}: expected [C, M, ...], classes first")
            self.examples = data.reshape(-1, *data.shape[2:])
            counts = torch.full((data.shape[0],), data.shape[1], dtype=torch.int64)
        else:
            per_class = [torch.as_tensor(d) for d in data]
            shapes = {tuple(d.shape[1:]) for d in per_class}
            if len(shapes) > 1:
                raise ValueError(f"per-class arrays have different example shapes {sorted(shapes)}")
            self.examples = torch.cat(per_class)
            counts = torch.tensor([len(d) for d in per_class], dtype=torch.int64)
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(f"ways={ways}, shots={shots}, queries={queries}: need ways ≥ 1, shots ≥ 1, queries ≥ 0")
        if ways > len(counts):
            raise ValueError(f"ways={ways} but the data has only {len(counts)} classes")
        if int(counts.min()) < shots + queries:
            smallest = int(counts.argmin())
            raise ValueError(f"class {smallest} has {int(counts[smallest])} examples, fewer than "
                             f"shots + queries = {shots + queries}")
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts
        self.ways, self.shots, self.queries = ways, shots, queries
        self.device = torch.device(device) if device is not None else self.examples.device
        self.dtype = dtype

    @property
    def num_classes(self) -> int:
        """C, the number of classes drawn from."""
        return len(self.counts)

    def sample(self, meta_batch: int, generator: Optional[torch.Generator] = None) -> TaskBatch:
        """Draw ``meta_batch`` tasks (T).

        Args:
            meta_batch: T, tasks in the batch.
            generator: CPU generator to draw from instead of the sampler's own.

        Returns:
            :class:`TaskBatch`: ``support_x`` [T, N·K, ...], ``support_y``
            [T, N·K], ``query_x`` [T, N·Q, ...], ``query_y`` [T, N·Q];
            inputs ``dtype`` on ``device``, labels int64 in 0..N−1.
        """
        if meta_batch < 1:
            raise ValueError(f"meta_batch={meta_batch}: need at least one task")
        g = self.generator if generator is None else generator
        n, per_class = self.ways, self.shots + self.queries
        classes = torch.rand(meta_batch, self.num_classes, generator=g, dtype=torch.float64)
        classes = classes.argsort(dim=1, stable=True)[:, :n]                          # [T, N]
        counts = self.counts[classes]                                                  # [T, N]
        keys = torch.rand(meta_batch, n, int(counts.max()), generator=g, dtype=torch.float64)
        keys.masked_fill_(torch.arange(keys.shape[-1]) >= counts[..., None], 2.0)     # absent examples last
        within = keys.argsort(dim=-1, stable=True)[..., :per_class]                  # [T, N, K+Q]
        index = (self.offsets[classes][..., None] + within).to(self.examples.device)
        picked = self.examples[index].to(self.device)                                # [T, N, K+Q, ...]
        picked = to_float(picked, self.dtype)
        labels = torch.arange(n, device=self.device)[None, :, None].expand(meta_batch, n, per_class)
        rest = picked.shape[3:]
        k = self.shots
        return TaskBatch(
            support_x=picked[:, :, :k].reshape(meta_batch, n * k, *rest),
            support_y=labels[:, :, :k].reshape(meta_batch, n * k),
            query_x=picked[:, :, k:].reshape(meta_batch, n * self.queries, *rest),
            query_y=labels[:, :, k:].reshape(meta_batch, n * self.queries),
        )


class TaskStream(IterableDataset):
    """Meta-batches from a sampler, as an ``IterableDataset``.

    Use with ``DataLoader(stream, batch_size=None, num_workers=W)``.  In the
    main process (W = 0) batches come from the sampler's own generator, so its
    ``state_dict`` resumes the stream exactly.  In worker ``i`` they come from
    a generator seeded by ``worker_seed(sampler.seed, i)``, restarted with
    every new iterator: give the sampler a new seed (e.g. ``seed + epoch``)
    for fresh tasks per epoch.

    Args:
        sampler: anything with ``seed`` and ``sample(meta_batch, generator)``.
        meta_batch: tasks per batch.
        num_batches: batches in one pass over all workers together; ``None``
            streams forever.
    """

    def __init__(self, sampler: Any, meta_batch: int, num_batches: Optional[int] = None):
        super().__init__()
        self.sampler, self.meta_batch, self.num_batches = sampler, meta_batch, num_batches

    def __iter__(self) -> Iterator[TaskBatch]:
        info = get_worker_info()
        if info is None:
            generator, first, step = None, 0, 1
        else:
            generator = torch.Generator().manual_seed(worker_seed(self.sampler.seed, info.id))
            first, step = info.id, info.num_workers
        index = first
        while self.num_batches is None or index < self.num_batches:
            yield self.sampler.sample(self.meta_batch, generator=generator)
            index += step
