"""Random numbers drawn example by example, where each example has its own generator, so that an
example's draws do not depend on the batch (or the process) it is computed in.

Sampling seeds image i's generator by (seed, i, stream); training seeds example g of step k by
(seed, k, g, stream). Every seed is mixed from such integer words by NumPy's ``SeedSequence``, so
neighbouring words give unrelated streams.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None
_EXAMPLE_SEEDS: ContextVar[tuple[int, ...] | None] = ContextVar("example_seeds", default=None)


def derived_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integer ``words``."""
    if any(word < 0 for word in words):
        raise ValueError(f"seed words must be non-negative, got {words}")
    high, low = np.random.SeedSequence(list(words)).generate_state(2, np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)


def seeded_generators(
    seeds: Iterable[int], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One ``torch.Generator`` on ``device`` per seed."""
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


def randn(
    shape: Sequence[int],
    *,
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise of ``shape`` ``[N, ...]``; one generator per image when a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator]
    )


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    if generator is None:
        return torch.randn_like(x)
    return randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def rand(
    num: int,
    *,
    generator: Generator = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``num`` uniform numbers in [0, 1) ``[N]``; the n-th from the n-th generator when a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(num, generator=generator, device=device, dtype=dtype)
    if len(generator) != num:
        raise ValueError(f"got {len(generator)} generators for {num} numbers")
    return torch.stack([torch.rand((), generator=g, device=device, dtype=dtype) for g in generator])


@contextmanager
def example_seeds(seeds: Sequence[int] | None) -> Iterator[None]:
    """Make ``seeds`` (one per example of the batch being computed) the examples' seeds for the
    random layers that read them (``admkit.nn.ExampleDropout``), within the block: forward and
    backward, where checkpointed blocks are recomputed."""
    token = _EXAMPLE_SEEDS.set(None if seeds is None else tuple(int(s) for s in seeds))
    try:
        yield
    finally:
        _EXAMPLE_SEEDS.reset(token)


def current_example_seeds() -> tuple[int, ...] | None:
    """The seeds set by :func:`example_seeds`, or None outside it."""
    return _EXAMPLE_SEEDS.get()
