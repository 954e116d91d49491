"""The gradient of one batch: micro-batches, each example's random generator, autocast, and one
all-reduce under DDP. ``admkit.train`` calls :func:`forward_backward` once per step.

A batch is a tensor or a (nested) tuple, list or dict of tensors whose first dimension is the
example. The loss function ``loss_fn(model, batch, generators)`` returns per-example terms
(see ``admkit.train``); ``generators`` holds one ``torch.Generator`` per example, seeded by (seed,
step, the example's place in the global batch, stream), so an example draws the same numbers in
any micro-batch and on any process; the network's dropout layers draw their masks from the same
seeds (``admkit.nn.ExampleDropout``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from admkit.noise import derived_seed, example_seeds, seeded_generators

LossFn = Callable[[torch.nn.Module, Any, Sequence[torch.Generator]], Mapping[str, Any]]
PRECISIONS = ("fp32", "bf16", "fp16")
# Seed streams of the examples' generators: training, and a held-out evaluation
# (train-classifier --val_data), so that evaluating never changes what training draws.
EXAMPLE_STREAM, EVALUATION_STREAM = 0, 2


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {key: map_tensors(value, fn) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(value, fn) for value in batch)
    return batch


def _leading_sizes(batch: Any) -> list[int]:
    if isinstance(batch, torch.Tensor):
        return [batch.shape[0]] if batch.ndim else []
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(items, (tuple, list)) or isinstance(batch, Mapping):
        return [size for item in items for size in _leading_sizes(item)]
    return []


def num_examples(batch: Any) -> int:
    sizes = _leading_sizes(batch)
    if not sizes:
        raise ValueError("a batch must hold at least one tensor with an example dimension")
    return sizes[0]


def _split_terms(terms: Mapping[str, Any], n: int) -> dict[str, torch.Tensor]:
    """Check the loss function's output: every tensor entry is per example, ``[n]``."""
    if "loss" not in terms:
        raise ValueError(f"loss_fn must return a 'loss' entry; it returned {sorted(terms)}")
    checked = {}
    for key, value in terms.items():
        if key == "num_timesteps":
            continue
        if not isinstance(value, torch.Tensor) or value.shape != (n,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"loss_fn entry {key!r} must be a [{n}] tensor, got {shape}")
        checked[key] = value
    if "t" in checked and "num_timesteps" not in terms:
        raise ValueError("loss_fn returned 't' without 'num_timesteps' (T)")
    return checked


def forward_backward(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    microbatch: int = 0,
    generators: Sequence[torch.Generator] | None = None,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Accumulate into ``.grad`` the gradient of the batch's mean weighted loss.

    The batch of ``N`` examples runs in micro-batches of ``microbatch`` (<= 0: all at once); each
    micro-batch's summed loss is divided by ``N``, so the gradients add up to the full batch's.
    Under DDP only the last micro-batch all-reduces. ``generators`` (one per example, or None)
    are split with the batch. Returns the detached terms, ``[N]`` each (plus ``num_timesteps``
    when given).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    size = num_examples(batch)
    if generators is not None and len(generators) != size:
        raise ValueError(f"got {len(generators)} generators for a batch of {size}")
    step = microbatch if 0 < microbatch < size else size
    device_type = next(model.parameters()).device.type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    parts: list[dict[str, torch.Tensor]] = []
    num_timesteps = None
    for start in range(0, size, step):
        part = map_tensors(batch, lambda x, a=start: x[a : a + step] if x.ndim else x)
        # Under DDP, gradients are all-reduced once, in the last micro-batch's backward.
        defer_sync = isinstance(model, DistributedDataParallel) and start + step < size
        part_generators = generators[start : start + step] if generators else None
        # Dropout masks come from the examples' seeds, in the forward and in the backward,
        # where checkpointed blocks recompute (admkit.nn.ExampleDropout).
        seeds = [g.initial_seed() for g in part_generators] if part_generators else None
        with model.no_sync() if defer_sync else nullcontext(), example_seeds(seeds):
            with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
                raw = loss_fn(model, part, part_generators)
            terms = _split_terms(raw, min(step, size - start))
            num_timesteps = raw.get("num_timesteps", num_timesteps)
            weight = terms["weight"].float() if "weight" in terms else 1.0
            objective = (terms["loss"].float() * weight).sum() / size
            (scaler.scale(objective) if scaler is not None else objective).backward()
        parts.append({key: value.detach() for key, value in terms.items()})
    merged: dict[str, Any] = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    if num_timesteps is not None:
        merged["num_timesteps"] = int(num_timesteps)
    return merged


def example_generators(
    seed: int,
    step: int,
    indices: Sequence[int],
    device: torch.device | str = "cpu",
    stream: int = EXAMPLE_STREAM,
) -> list[torch.Generator]:
    """The generators of the examples at positions ``indices`` of global batch ``step``."""
    return seeded_generators((derived_seed(seed, step, i, stream) for i in indices), device)
