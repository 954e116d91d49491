"""Samplers: ancestral DDPM and DDIM (with its inversion), as free functions over a model function.

Notation and the model-function contract are those of ``admkit.diffusion``; the condition
function of classifier guidance is that of ``admkit.guidance``. Every sampler has the same
signature, so they can be swapped by name (``SAMPLERS``)::

    sampler(diffusion, model_fn, x_T, *, model_kwargs=None, cond_fn=None, clip_denoised=True,
            denoised_fn=None, generator=None, progress=False, callback=None, **options) -> Sample

``x_T`` ``[N, C, H, W]`` is the starting noise (drawn by the caller, so an image can depend on its
own seed only); ``diffusion`` may be respaced, the sampler then takes its T steps. ``generator``
draws the per-step noise: a ``torch.Generator``, or one per image so that each image's noise does
not depend on the batch it is drawn in; None uses torch's global generator, as guided-diffusion
does. ``callback(i, step)`` sees each ``Step`` at chain index i. The result carries the number
of network evaluations, the cost measure that compares samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from admkit.diffusion import Diffusion, ModelFn
from admkit.guidance import CondFn, guided_mean, guided_score

Generator = torch.Generator | Sequence[torch.Generator] | None


class Step(NamedTuple):
    """One reverse (or, for inversion, forward) step: the new x and the x̂_0 it used."""

    sample: Tensor  # [N, C, H, W]
    x_0: Tensor  # [N, C, H, W]


class Sample(NamedTuple):
    """A finished run: the final x ``[N, C, H, W]`` and how many network calls it took."""

    sample: Tensor
    num_model_evals: int


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


def _full(x: Tensor, i: int) -> Tensor:
    return torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)


def _nonzero_mask(t: Tensor, ndim: int) -> Tensor:
    # No noise is added on the step that lands on x_0.
    return (t != 0).float().view(-1, *([1] * (ndim - 1)))


def _steps(indices: Sequence[int], progress: bool) -> Iterator[int]:
    return iter(tqdm(indices, leave=False)) if progress else iter(indices)


# ---------------------------------------------------------------------------------------------
# Ancestral sampling (DDPM Alg. 2; with guidance, ADM Alg. 1)


def ddpm_step(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    *,
    model_kwargs: dict | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    generator: Generator = None,
) -> Step:
    """x_{t-1} ~ p_θ(x_{t-1} | x_t) at chain indices t ``[N]``."""
    # 1. μ_θ, Σ_θ from the network.
    pred = diffusion.predict(
        model_fn,
        x_t,
        t,
        model_kwargs=model_kwargs,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
    )
    # 2. z ~ N(0, I), drawn before the classifier runs, so the noise stream is guided-diffusion's.
    z = randn_like(x_t, generator)
    # 3. ADM Alg. 1: μ ← μ + s Σ ∇ log p_φ(y | x_t), the gradient taken at x_t.
    if cond_fn is not None:
        gradient = cond_fn(x_t, diffusion.model_timesteps(t), **(model_kwargs or {}))
        pred = guided_mean(pred, gradient)
    # 4. x_{t-1} = μ + σ z.
    sample = pred.mean + _nonzero_mask(t, x_t.ndim) * torch.exp(0.5 * pred.log_variance) * z
    return Step(sample=sample, x_0=pred.x_0)


def ddpm_sample(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_T: Tensor,
    *,
    model_kwargs: dict | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    generator: Generator = None,
    progress: bool = False,
    callback: Callable[[int, Step], None] | None = None,
) -> Sample:
    """Ancestral sampling from x_T over every step of ``diffusion``: T network calls."""
    x = x_T
    for i in _steps(range(diffusion.num_timesteps - 1, -1, -1), progress):
        with torch.no_grad():
            step = ddpm_step(
                diffusion,
                model_fn,
                x,
                _full(x, i),
                model_kwargs=model_kwargs,
                cond_fn=cond_fn,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                generator=generator,
            )
        if callback is not None:
            callback(i, step)
        x = step.sample
    return Sample(sample=x, num_model_evals=diffusion.num_timesteps)


# ---------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021, Eq. 12; with guidance, ADM Alg. 2)


def ddim_step(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    *,
    eta: float = 0.0,
    model_kwargs: dict | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    generator: Generator = None,
) -> Step:
    """One DDIM step from chain index t to t-1; eta = 0 is deterministic, 1 is DDPM-like.

    A learned Σ_θ is ignored: DDIM sets its own σ.
    """
    # 1. x̂_0 and ε̂ from the network (ε̂ re-derived from the clipped x̂_0).
    pred = diffusion.predict(
        model_fn,
        x_t,
        t,
        model_kwargs=model_kwargs,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
    )
    # 2. ADM Alg. 2: ε̂ ← ε̂ - √(1 - ᾱ_t) s ∇ log p_φ(y | x_t).
    if cond_fn is not None:
        gradient = cond_fn(x_t, diffusion.model_timesteps(t), **(model_kwargs or {}))
        pred = guided_score(diffusion, pred, x_t, t, gradient)
    # 3. σ_t(η) of DDIM Eq. 16.
    alpha_bar = diffusion.gather("alphas_cumprod", t, x_t.ndim)
    alpha_bar_prev = diffusion.gather("alphas_cumprod_prev", t, x_t.ndim)
    sigma = (
        eta
        * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
        * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    )
    # 4. z is drawn even when η = 0, so the noise stream matches guided-diffusion's.
    z = randn_like(x_t, generator)
    # 5. x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ²) ε̂ + σ z  (DDIM Eq. 12).
    mean = (
        pred.x_0 * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * pred.eps
    )
    sample = mean + _nonzero_mask(t, x_t.ndim) * sigma * z
    return Step(sample=sample, x_0=pred.x_0)


def ddim_sample(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_T: Tensor,
    *,
    eta: float = 0.0,
    model_kwargs: dict | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    generator: Generator = None,
    progress: bool = False,
    callback: Callable[[int, Step], None] | None = None,
) -> Sample:
    """DDIM sampling from x_T over every step of ``diffusion``: T network calls."""
    x = x_T
    for i in _steps(range(diffusion.num_timesteps - 1, -1, -1), progress):
        with torch.no_grad():
            step = ddim_step(
                diffusion,
                model_fn,
                x,
                _full(x, i),
                eta=eta,
                model_kwargs=model_kwargs,
                cond_fn=cond_fn,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
                generator=generator,
            )
        if callback is not None:
            callback(i, step)
        x = step.sample
    return Sample(sample=x, num_model_evals=diffusion.num_timesteps)


def ddim_reverse_step(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_t: Tensor,
    t: Tensor,
    *,
    model_kwargs: dict | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
) -> Step:
    """The deterministic DDIM ODE run forward: x_t at chain index t to x_{t+1}."""
    # 1. x̂_0 and ε̂ at (x_t, t).
    pred = diffusion.predict(
        model_fn,
        x_t,
        t,
        model_kwargs=model_kwargs,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
    )
    # 2. x_{t+1} = √ᾱ_{t+1} x̂_0 + √(1 - ᾱ_{t+1}) ε̂ (DDIM Eq. 12 with σ = 0, read upwards).
    alpha_bar_next = diffusion.gather("alphas_cumprod_next", t, x_t.ndim)
    sample = pred.x_0 * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * pred.eps
    return Step(sample=sample, x_0=pred.x_0)


def ddim_invert(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_0: Tensor,
    *,
    model_kwargs: dict | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    progress: bool = False,
    callback: Callable[[int, Step], None] | None = None,
) -> Sample:
    """Encode data x_0 into the latent that ``ddim_sample`` (η = 0) maps back to it.

    x_0 is read as the chain's x at index 0 and carried up to index T-1, where DDIM sampling
    starts: T-1 network calls.
    """
    x = x_0
    for i in _steps(range(diffusion.num_timesteps - 1), progress):
        with torch.no_grad():
            step = ddim_reverse_step(
                diffusion,
                model_fn,
                x,
                _full(x, i),
                model_kwargs=model_kwargs,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
            )
        if callback is not None:
            callback(i, step)
        x = step.sample
    return Sample(sample=x, num_model_evals=diffusion.num_timesteps - 1)


SAMPLERS: dict[str, Callable[..., Sample]] = {"ddpm": ddpm_sample, "ddim": ddim_sample}
