"""Shared pieces of the benchmark scripts: device naming, timing, JSON lines, the reference path.

The reference path re-states, in our own words, how the original computes a network step:
attention through two einsums with q and k each scaled by c^(-1/4) and a float32 softmax, no
fused kernel, and every attention block recomputed in the backward pass (the original
checkpoints its attention blocks always, whatever ``use_checkpoint`` says: reference §3.12);
upsampling convolutions applied to the nearest-upsampled map; the scale-shift norm as a
GroupNorm followed by a product and a sum; no autocast, no compilation.
Benchmarks time it in the same run as admkit's path, so every speed figure is a ratio measured
on one machine at one time.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import admkit.nn

# The small configuration every benchmark uses by default on a CPU (a 32-pixel class-conditional
# ADM with learned variances, attention at 16 and 8 pixels, BigGAN up/down blocks).
SMALL = dict(
    image_size=32,
    num_channels=64,
    num_res_blocks=2,
    channel_mult="1,2,2",
    attention_resolutions="16,8",
    num_head_channels=32,
    class_cond=True,
    learn_sigma=True,
    resblock_updown=True,
    use_scale_shift_norm=True,
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def paired(fn, reference, device: torch.device, repeats: int, warmup: int = 2):
    """(median seconds of ``fn``, median ratio reference/``fn``), each ``fn`` call timed right
    after a ``reference`` call, so that the ratio survives a shared machine's drift."""
    for _ in range(warmup):  # allocator, kernels, compilation
        reference()
        fn()
    seconds, ratios = [], []
    for _ in range(repeats):
        reference_seconds = time_call(reference, device, 1, warmup=0)
        own = time_call(fn, device, 1, warmup=0)
        seconds.append(own)
        ratios.append(reference_seconds / own)
    return statistics.median(seconds), statistics.median(ratios)


def einsum_qkv_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    """The original's attention arithmetic: einsum scores, float32 softmax, einsum values."""
    batch, width, length = qkv.shape
    c = width // (3 * num_heads)
    if new_order:
        q, k, v = qkv.chunk(3, dim=1)
        q, k, v = (part.reshape(batch * num_heads, c, length) for part in (q, k, v))
    else:
        q, k, v = qkv.reshape(batch * num_heads, 3 * c, length).split(c, dim=1)
    scale = 1 / math.sqrt(math.sqrt(c))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


def _always_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
    # The original's AttentionBlock.forward: checkpoint(self._forward, (x,), params, True).
    if torch.is_grad_enabled():
        return checkpoint(self._forward, x, use_reentrant=False)
    return self._forward(x)


def _upsampled_then_convolved(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    # The original's Upsample and up-ResBlock: the nearest-upsampled map, then the 3x3 conv.
    return conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _normalized_then_modulated(self, x, scale, shift) -> torch.Tensor:
    # The original's scale-shift norm: GroupNorm, then a product and a sum over the activation.
    scale, shift = (part.to(x.dtype)[..., None, None] for part in (scale, shift))
    return self(x) * (1 + scale) + shift


@contextlib.contextmanager
def reference_network():
    """Run admkit's networks the original's way inside this block: its einsum attention, each
    attention block recomputed in the backward pass as the original does, upsampling
    convolutions applied to the upsampled map (admkit convolves by sub-pixel phases), and the
    scale-shift norm as GroupNorm, product and sum (admkit folds it into one GroupNorm)."""
    fused, forward = admkit.nn.qkv_attention, admkit.nn.AttentionBlock.forward
    upsample_conv, modulated = admkit.nn.upsample_conv, admkit.nn.GroupNorm32.modulated
    admkit.nn.qkv_attention = einsum_qkv_attention
    admkit.nn.AttentionBlock.forward = _always_checkpointed
    admkit.nn.upsample_conv = _upsampled_then_convolved
    admkit.nn.GroupNorm32.modulated = _normalized_then_modulated
    try:
        yield
    finally:
        admkit.nn.qkv_attention = fused
        admkit.nn.AttentionBlock.forward = forward
        admkit.nn.upsample_conv = upsample_conv
        admkit.nn.GroupNorm32.modulated = modulated


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device.type, dtype=torch_dtype)
