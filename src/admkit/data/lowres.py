"""Low-resolution conditioning for upsamplers: the original's area downsampling, plus augmentation.

| symbol | meaning |
| --- | --- |
| x | high-resolution batch ``[N, C, L, L]`` in [−1, 1] |
| y | its low-resolution version ``[N, C, s, s]``, s < L |
| σ_blur | standard deviation of the Gaussian blur kernel, in low-res pixels |
| σ_noise | standard deviation of the additive Gaussian noise, in [−1, 1] units |

guided-diffusion conditions its upsamplers on ``F.interpolate(x, s, mode="area")`` (reference
§1.7). Degrading y further during training (blur, noise: beyond the original, as in cascaded
diffusion) makes an upsampler forgive the artefacts of the base model it will be chained to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from admkit.errors import UserError
from admkit.noise import Generator, randn


def make_low_res(x: torch.Tensor, small_size: int) -> torch.Tensor:
    """y = area downsampling of x to ``small_size``: ``[N, C, L, L]`` → ``[N, C, s, s]``.

    Area interpolation averages each input pixel's share of an output pixel, so a batch whose
    size L is a multiple of s is reduced by plain block means.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a batch [N, C, H, W], got shape {list(x.shape)}")
    if not 0 < small_size <= min(x.shape[-2:]):
        raise UserError(
            f"small_size {small_size} must be between 1 and the image size {x.shape[-1]}"
        )
    return F.interpolate(x, size=(small_size, small_size), mode="area")


def gaussian_blur(y: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each channel of ``[N, C, H, W]`` with a Gaussian of std ``sigma`` pixels.

    A separable kernel truncated at 3σ; edges repeat the border pixel, so a constant image stays
    constant and small images of any size work.
    """
    if sigma <= 0:
        return y
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=y.dtype, device=y.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = y.shape[1]
    padded = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def augment_low_res(
    y: torch.Tensor,
    *,
    blur_sigma: float = 0.0,
    noise_std: float = 0.0,
    generator: Generator = None,
) -> torch.Tensor:
    """Degrade the conditioning ``[N, C, s, s]``: blur by σ_blur, then add N(0, σ_noise²) noise.

    Both at 0 return y unchanged. The noise is drawn from ``generator`` (on y's device), so a
    seeded generator makes the augmentation reproducible. The result is not clipped: the model
    sees the noise as drawn. A list of generators draws image n's noise from the n-th.
    """
    if blur_sigma < 0 or noise_std < 0:
        raise UserError(
            f"low-res augmentation strengths must be zero or positive, got blur {blur_sigma} "
            f"and noise {noise_std}"
        )
    y = gaussian_blur(y, blur_sigma)
    if noise_std > 0:
        noise = randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        y = y + noise_std * noise
    return y
