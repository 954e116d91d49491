"""Deterministic, resumable batches, sharded across ranks: what makes a resumed run bit-identical.

The examples form one endless stream: epoch e is a permutation of the dataset drawn from
(seed, e), and the stream is epoch 0, then epoch 1, and so on. Global step s takes stream
positions [s·B, (s+1)·B), so a batch may straddle two epochs and every example is seen once per
epoch. Rank r of W takes the contiguous slice [r·B/W, (r+1)·B/W) of that global batch, so the
ranks' shards, concatenated in rank order, are exactly the batch one process with batch B sees.

Horizontal flips come from a generator seeded by (seed, step), one coin per position in the
global batch. Nothing random happens in the loading workers, so ``num_workers`` changes speed,
never the batches, and starting at ``start_step=k`` reproduces an uninterrupted run from step k.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from admkit.errors import UserError

# Separate seed streams, so the order and the flips never share random numbers.
_ORDER_STREAM = 0
_FLIP_STREAM = 1


def _generator(*words: int) -> np.random.RandomState:
    # SeedSequence mixes the words into a well-spread seed; the legacy RandomState then draws
    # with numpy's frozen algorithms, so a run resumed after a numpy upgrade sees the same order.
    return np.random.RandomState(np.random.SeedSequence(list(words)).generate_state(4))


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in ``epoch``: a permutation of ``range(num_examples)``."""
    return _generator(seed, _ORDER_STREAM, epoch).permutation(num_examples)


def step_flips(global_batch_size: int, seed: int, step: int) -> np.ndarray:
    """Whether each position of global batch ``step`` is flipped: bool ``[B]``, each p = 1/2."""
    return _generator(seed, _FLIP_STREAM, step).random_sample(global_batch_size) < 0.5


class StepBatchSampler(Sampler[list[tuple[int, bool]]]):
    """Yields, for each global step from ``start_step``, this rank's ``(index, flip)`` keys.

    The keys index an ``admkit.data`` dataset (which applies the flip). ``stop_step``
    (exclusive) ends the stream; without it the stream is endless.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        stop_step: int | None = None,
        random_flip: bool = False,
    ) -> None:
        if num_examples < 1:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if global_batch_size < 1:
            raise UserError(f"batch_size must be a positive number, got {global_batch_size}")
        if global_batch_size % world_size:
            raise UserError(
                f"batch_size {global_batch_size} is not divisible by the {world_size} processes: "
                f"use a multiple of {world_size}"
            )
        if seed < 0:
            raise UserError(f"seed must be zero or positive, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if start_step < 0:
            raise ValueError(f"start_step must be zero or positive, got {start_step}")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // world_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.stop_step = stop_step
        self.random_flip = random_flip
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            # Steps move forward, so earlier epochs are never needed again.
            self._orders = {e: o for e, o in self._orders.items() if e > epoch - 2}
            self._orders[epoch] = epoch_permutation(self.num_examples, self.seed, epoch)
        return self._orders[epoch]

    def keys(self, step: int) -> list[tuple[int, bool]]:
        """This rank's ``(index, flip)`` pairs for global step ``step``, in batch order."""
        first = step * self.global_batch_size + self.rank * self.batch_size
        positions = np.arange(first, first + self.batch_size)
        epochs, offsets = np.divmod(positions, self.num_examples)
        indices = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            indices[chosen] = self._order(int(epoch))[offsets[chosen]]
        if self.random_flip:
            start = self.rank * self.batch_size
            flips = step_flips(self.global_batch_size, self.seed, step)
            flips = flips[start : start + self.batch_size]
        else:
            flips = np.zeros(self.batch_size, dtype=bool)
        return [(int(i), bool(f)) for i, f in zip(indices, flips)]

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            yield self.keys(step)
            step += 1

    def __len__(self) -> int:
        if self.stop_step is None:
            raise TypeError("an endless StepBatchSampler has no length; give stop_step")
        return max(0, self.stop_step - self.start_step)


def iterate_batches(
    dataset: Dataset,
    global_batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    stop_step: int | None = None,
    num_workers: int = 2,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's batches ``(images [B/W, 3, S, S], labels [B/W] int64)`` from ``start_step``.

    Flips are drawn when ``dataset.random_flip`` is set. Loading runs in ``num_workers``
    ``DataLoader`` processes (0 loads in this process); the batches are the same either way.
    """
    if num_workers < 0:
        raise UserError(f"num_workers must be zero or positive, got {num_workers}")
    sampler = StepBatchSampler(
        len(dataset),
        global_batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        stop_step=stop_step,
        random_flip=bool(getattr(dataset, "random_flip", False)),
    )
    # One pass over an endless sampler is the whole run, so persistent_workers (which only
    # saves restarting workers between passes) would buy nothing here.
    # A starting DataLoader draws its workers' base seed from a generator; giving it its own
    # keeps that draw out of torch's global stream (dropout...), so resumed runs stay exact.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
    yield from loader
