"""Samplers as free functions over a model function: ancestral DDPM, DDIM (with its inversion), and
the fast solvers DPM-Solver++ 2M (ODE, and SDE with η > 0) and EDM's Heun.

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

Each sampler walks the noise levels of ``diffusion``'s chain, so the steps are chosen by
respacing: guided-diffusion's strings (``space_timesteps``), or ``admkit.step_selection``'s
Karras or log-SNR spacing, each mapped to trained steps. ``levels_for_steps`` turns a budget of
network evaluations into a number of levels: one evaluation per level for ``ddpm``, ``ddim``,
``dpm++2m`` and ``dpm++2m-sde``; 2·levels - 1 for ``heun``. Classifier guidance (``cond_fn``)
enters DDPM as the mean shift, DDIM as Alg. 2 and the fast solvers through the score
(``guidance.classifier_score_model``).

The fast solvers' notation, on top of ``admkit.diffusion``'s:

| symbol | code | meaning |
| --- | --- | --- |
| α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t) | alpha, sigma | x_t = α_t x_0 + σ_t ε (DPM-Solver's VP notation) |
| λ_t = log(α_t / σ_t) | lam | half the log-SNR; DPM-Solver++ steps are h = λ_t - λ_s |
| σ^EDM = σ_t / α_t | sigma | EDM's noise level; x̃ = x_t / α_t = x_0 + σ^EDM ε |
| D(x̃; σ) | denoised | x̂_0 of the network at that level |
| γ, S_churn | gamma, s_churn | EDM Alg. 2's stochastic churn, σ̂ = σ (1 + γ) |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from admkit.diffusion import Diffusion, ModelFn
from admkit.errors import UserError
from admkit.guidance import CondFn, classifier_score_model, guided_mean, guided_score
from admkit.noise import Generator, randn_like
from admkit.step_selection import edm_sigmas


class Step(NamedTuple):
    """One reverse (or, for inversion, forward) step: the new x and the x̂_0 it used."""

    sample: Tensor  # [N, C, H, W]
    x_0: Tensor  # [N, C, H, W]


class Sample(NamedTuple):
    """A finished run: the final x ``[N, C, H, W]`` and how many network calls it took."""

    sample: Tensor
    num_model_evals: int


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
    return _reverse_chain(
        ddpm_step,
        diffusion,
        model_fn,
        x_T,
        progress=progress,
        callback=callback,
        model_kwargs=model_kwargs,
        cond_fn=cond_fn,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        generator=generator,
    )


def _reverse_chain(
    step_fn: Callable[..., Step],
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_T: Tensor,
    *,
    progress: bool,
    callback: Callable[[int, Step], None] | None,
    **step_options,
) -> Sample:
    """Apply ``step_fn`` from chain index T-1 down to 0, one network call per step."""
    x = x_T
    for i in _steps(range(diffusion.num_timesteps - 1, -1, -1), progress):
        with torch.no_grad():
            step = step_fn(diffusion, model_fn, x, _full(x, i), **step_options)
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
    return _reverse_chain(
        ddim_step,
        diffusion,
        model_fn,
        x_T,
        progress=progress,
        callback=callback,
        eta=eta,
        model_kwargs=model_kwargs,
        cond_fn=cond_fn,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        generator=generator,
    )


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


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ 2M (Lu et al. 2022, Alg. 2: multistep, second order, data prediction)


def dpm_solver_2m_sample(
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
    eta: float = 0.0,
) -> Sample:
    """DPM-Solver++ 2M from x_T through every level of ``diffusion``: T network calls.

    The exponential integrator in λ with x̂_0 extrapolated linearly from the last two
    evaluations; the first step and the last (to σ = 0, where it returns x̂_0 as DDIM does) are
    first order. With ``eta`` = 0 (the default) it solves the probability-flow ODE and is
    deterministic (``generator`` unused). With ``eta`` > 0 it solves the reverse SDE scaled by η
    (η = 1: SDE-DPM-Solver++(2M) of Lu et al. 2022): each step keeps e^{-ηh} of the
    deterministic part and adds fresh noise of variance σ_t²(1 - e^{-2ηh}) from ``generator``.
    """
    if eta < 0:
        raise ValueError(f"eta must be 0 or more, got {eta}")
    if cond_fn is not None:
        model_fn = classifier_score_model(model_fn, cond_fn, diffusion)
    alpha_bar = diffusion.alphas_cumprod
    x, x_0_last, h_last = x_T, None, None
    for i in _steps(range(diffusion.num_timesteps - 1, -1, -1), progress):
        with torch.no_grad():
            # 1. D_i = x̂_0(x_{t_i}, t_i).
            pred = diffusion.predict(
                model_fn,
                x,
                _full(x, i),
                model_kwargs=model_kwargs,
                clip_denoised=clip_denoised,
                denoised_fn=denoised_fn,
            )
            if i == 0:
                # 2. λ = ∞ at x_0: e^{-h} = 0 and the step returns D itself.
                x = pred.x_0
            else:
                # 2. h = λ_t - λ_s from level s = t_i to t = t_{i-1}.
                s_bar, t_bar = alpha_bar[i], alpha_bar[i - 1]
                h = _lam(t_bar) - _lam(s_bar)
                # 3. D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i (first order at first).
                denoised = pred.x_0
                if x_0_last is not None:
                    r = h_last / h
                    denoised = (1 + 1 / (2 * r)) * pred.x_0 - 1 / (2 * r) * x_0_last
                # 4. x_t = (σ_t/σ_s) e^{-ηh} x_s + α_t (1 - e^{-(1+η)h}) D + σ_t √(1 - e^{-2ηh}) z;
                #    η = 0 is DPM-Solver++ Eq. 9 / Alg. 2.
                ratio = math.sqrt((1 - t_bar) / (1 - s_bar)) * math.exp(-eta * h)
                x = ratio * x - math.sqrt(t_bar) * math.expm1(-(1 + eta) * h) * denoised
                if eta > 0:
                    spread = math.sqrt((1 - t_bar) * -math.expm1(-2 * eta * h))
                    x = x + spread * randn_like(x, generator)
                x_0_last, h_last = pred.x_0, h
        if callback is not None:
            callback(i, Step(sample=x, x_0=pred.x_0))
    return Sample(sample=x, num_model_evals=diffusion.num_timesteps)


def dpm_solver_2m_sde_sample(diffusion: Diffusion, model_fn: ModelFn, x_T: Tensor, **options):
    """SDE-DPM-Solver++(2M): :func:`dpm_solver_2m_sample` with η = 1, T network calls.

    Stochastic like DDPM, so a model's errors are partly washed out by fresh noise instead of
    carried along one ODE trajectory, and second order in the deterministic part."""
    return dpm_solver_2m_sample(diffusion, model_fn, x_T, eta=1.0, **options)


def _lam(alpha_bar: float) -> float:
    # λ = log(α/σ) = ½ log(ᾱ / (1 - ᾱ)), in float64.
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


# ---------------------------------------------------------------------------------------------
# Heun (Karras et al. 2022, EDM Alg. 2), on the chain's noise levels


def heun_sample(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_T: Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise_levels: Diffusion | None = None,
    model_kwargs: dict | None = None,
    cond_fn: CondFn | None = None,
    clip_denoised: bool = True,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    generator: Generator = None,
    progress: bool = False,
    callback: Callable[[int, Step], None] | None = None,
) -> Sample:
    """EDM's second-order Heun sampler over the T levels of ``diffusion``: 2T - 1 network calls.

    It integrates dx̃/dσ = (x̃ - D(x̃; σ))/σ in x̃ = x_t/√ᾱ_t, from σ_{T-1} down to σ = 0 (a last
    Euler step, whose end point is x̂_0). With ``s_churn`` > 0 each level σ in [s_tmin, s_tmax]
    is first raised to σ̂ = σ (1 + γ), γ = min(s_churn/T, √2 - 1), by fresh noise drawn from
    ``generator``; the network only knows trained steps, so σ̂ is rounded to the nearest level of
    ``noise_levels`` (default: this chain; pass the unrespaced chain for fine rounding).
    """
    levels = diffusion if noise_levels is None else noise_levels
    if noise_levels is not None and not set(diffusion.timestep_map) <= set(levels.timestep_map):
        raise ValueError("noise_levels must hold every step of the sampling chain")
    if cond_fn is not None:
        model_fn = classifier_score_model(model_fn, cond_fn, levels)
    sigmas, level_sigmas = edm_sigmas(diffusion), edm_sigmas(levels)
    evals = 0

    def denoise(x_tilde: Tensor, chain: Diffusion, index: int) -> Tensor:
        # D(x̃; σ): the network sees x_t = √ᾱ x̃ at that chain's step.
        nonlocal evals
        evals += 1
        x_t = math.sqrt(chain.alphas_cumprod[index]) * x_tilde
        return chain.predict(
            model_fn,
            x_t,
            _full(x_t, index),
            model_kwargs=model_kwargs,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
        ).x_0

    num_levels = diffusion.num_timesteps
    x = x_T / math.sqrt(diffusion.alphas_cumprod[-1])
    for i in _steps(range(num_levels - 1, -1, -1), progress):
        sigma, sigma_next = sigmas[i], (sigmas[i - 1] if i > 0 else 0.0)
        with torch.no_grad():
            # 1. Churn: raise σ to σ̂ (a trained level) by adding N(0, (σ̂² - σ²) S_noise²) noise.
            chain, index, sigma_hat, x_hat = diffusion, i, sigma, x
            gamma = min(s_churn / num_levels, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0
            if gamma > 0:
                chain = levels
                index = _nearest_level(level_sigmas, sigma * (1 + gamma), minimum=sigma)
                sigma_hat = level_sigmas[index]
                if sigma_hat > sigma:
                    z = randn_like(x, generator)
                    x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * z
            # 2. Euler step: d = (x̂ - D(x̂; σ̂))/σ̂, x' = x̂ + (σ_{i+1} - σ̂) d.
            denoised = denoise(x_hat, chain, index)
            d = (x_hat - denoised) / sigma_hat
            x = x_hat + (sigma_next - sigma_hat) * d
            # 3. Heun correction with the slope at the end point (not on the last step to σ = 0).
            if i > 0:
                d_next = (x - denoise(x, diffusion, i - 1)) / sigma_next
                x = x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)
        if callback is not None:
            alpha_next = math.sqrt(diffusion.alphas_cumprod[i - 1]) if i > 0 else 1.0
            callback(i, Step(sample=alpha_next * x, x_0=denoised))
    return Sample(sample=x, num_model_evals=evals)


def _nearest_level(level_sigmas: np.ndarray, target: float, minimum: float) -> int:
    # The level closest to target in log σ among those at least `minimum` (never below σ).
    candidates = np.flatnonzero(level_sigmas >= minimum * (1 - 1e-12))
    distance = np.abs(np.log(level_sigmas[candidates]) - math.log(target))
    return int(candidates[np.argmin(distance)])


def levels_for_steps(sampler: str, steps: int) -> int:
    """Noise levels to respace to for a budget of ``steps`` network evaluations per image.

    ``ddpm``, ``ddim``, ``dpm++2m`` and ``dpm++2m-sde`` evaluate once per level; ``heun``
    2·levels - 1 times, so it gets (steps + 1) // 2 levels (19 or 20 evaluations → 10 levels,
    19 evaluations).
    """
    get_sampler(sampler)
    if sampler == "heun":
        if steps < 3:
            raise UserError(f"heun needs at least 3 network evaluations (--steps 3), got {steps}")
        return (steps + 1) // 2
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    return steps


SAMPLERS: dict[str, Callable[..., Sample]] = {
    "ddpm": ddpm_sample,
    "ddim": ddim_sample,
    "dpm++2m": dpm_solver_2m_sample,
    "dpm++2m-sde": dpm_solver_2m_sde_sample,
    "heun": heun_sample,
}
SAMPLER_HELP = {
    "ddpm": "ancestral sampling (DDPM; ADM Alg. 1 with a classifier), one evaluation per step",
    "ddim": "DDIM (--eta, 0 = deterministic; ADM Alg. 2 with a classifier)",
    "dpm++2m": "DPM-Solver++ 2M, deterministic multistep, good at 10-25 evaluations",
    "dpm++2m-sde": "SDE-DPM-Solver++ 2M, stochastic multistep, one evaluation per step",
    "heun": "EDM's second-order Heun (--s_churn for stochasticity), 2 evaluations per step",
}


def get_sampler(name: str) -> Callable[..., Sample]:
    """The sampler called ``name``; an unknown name is a UserError listing the known ones."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
