"""Standard normal noise, drawn image by image where each image has its own generator, so that an
image's noise does not depend on the batch (or the process) it is computed in."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None


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
