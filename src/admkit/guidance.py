"""Classifier guidance (ADM §4): the classifier gradient and how it enters a reverse step.

Notation as in ``admkit.diffusion``; s is the guidance scale, y the class, p_φ the noise-aware
classifier. A *condition function* ``cond_fn(x_t, t_model, **model_kwargs) -> g`` returns
g = s·∇_{x_t} log p_φ(y | x_t) ``[N, C, H, W]``, the scale already folded in; it receives the
same timesteps as the network (``Diffusion.model_timesteps``: original step indices of a
respaced chain) and the same keyword arguments (``y`` among them).

It enters a step in one of two ways, both evaluated at x_t (ADM Algs. 1 and 2):

* ``guided_mean`` (ancestral sampling, Alg. 1): μ ← μ_θ + Σ_θ g;
* ``guided_score`` (DDIM, Alg. 2): ε̂ ← ε̂ - √(1 - ᾱ_t) g, then x̂_0 and μ from the new ε̂.

The ODE solvers (DPM-Solver++, Heun) have no mean or DDIM step to shift, so for them the same
gradient enters through the score, as a wrapper around the model function:

* ``classifier_score_model``: ε̂ ← ε̂ - √(1 - ᾱ_t) g on the network's mean channels.

Guidance that changes the model itself is a wrapper too; wrappers compose:

* ``classifier_free_model`` (Ho & Salimans 2022): ε̂ = ε̂_∅ + w (ε̂_y - ε̂_∅), w the CFG scale, ∅
  the null label, both branches in one batch;
* ``guided_by_model``: D = D_0 + w (D_1 - D_0) with a second network D_0, the guide:
  autoguidance (Karras et al. 2024) when D_0 is a weaker version of the model D_1 (smaller, or
  trained for less long), EDM2's classifier-free guidance when D_0 is an unconditional network;
* ``guidance_interval``: guide only while the original step lies in [t_lo, t_hi];
* ``dynamic_threshold`` (Imagen): a ``denoised_fn`` that rescales x̂_0 into [-1, 1].

| symbol | code | meaning |
| --- | --- | --- |
| g | gradient | s·∇_{x_t} log p_φ(y given x_t), from ``cond_fn`` |
| w | scale | classifier-free guidance scale (1: the conditional model, 0: the unconditional) |
| D_1, D_0 | model_fn, guide_fn | the guided model and its guide (a second network) |
| ∅ | null_label | the label index a model trained with label dropout reads as "no class" |
| p | percentile | dynamic thresholding quantile of abs(x̂_0) |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from admkit.diffusion import Diffusion, ModelFn, ModelMeanType, Prediction

CondFn = Callable[..., Tensor]


def classifier_grad_fn(classifier: Callable[[Tensor, Tensor], Tensor], scale: float) -> CondFn:
    """The condition function s·∇_x log softmax(classifier(x, t))[y] of a classifier.

    ``classifier(x, t)`` returns logits ``[N, K]``. The returned ``cond_fn(x, t, y, **_)``
    differentiates the sum over the batch of the chosen log-probabilities, which equals each
    image's own gradient since images do not interact; other keyword arguments meant for the
    diffusion model (``low_res``...) are ignored.
    """

    def cond_fn(x: Tensor, t: Tensor, y: Tensor | None = None, **_: object) -> Tensor:
        if y is None:
            raise ValueError("classifier guidance needs class labels: pass y in model_kwargs")
        # Samplers run under no_grad; the gradient needs a graph of its own.
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(len(log_probs), device=log_probs.device), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def guided_mean(pred: Prediction, gradient: Tensor) -> Prediction:
    """ADM Alg. 1: shift μ_θ by Σ_θ g (the variance, not the standard deviation).

    x̂_0 and ε̂ are left as they were: ancestral steps use only the mean.
    """
    mean = pred.mean.float() + pred.variance * gradient.float()
    return dataclasses.replace(pred, mean=mean)


def guided_score(
    diffusion: Diffusion, pred: Prediction, x_t: Tensor, t: Tensor, gradient: Tensor
) -> Prediction:
    """ADM Alg. 2: ε̂ ← ε̂ - √(1 - ᾱ_t) g, then x̂_0 and μ recomputed from the new ε̂.

    The new x̂_0 is not clipped again (guided-diffusion's behaviour; quirk §12.12); ε̂ is re-derived
    from it, as DDIM does.
    """
    alpha_bar = diffusion.gather("alphas_cumprod", t, x_t.ndim)
    eps = diffusion.eps_from_x0(x_t, t, pred.x_0) - (1 - alpha_bar).sqrt() * gradient
    x_0 = diffusion.x0_from_eps(x_t, t, eps)
    mean, _, _ = diffusion.q_posterior_mean_variance(x_0, x_t, t)
    return dataclasses.replace(pred, mean=mean, x_0=x_0, eps=diffusion.eps_from_x0(x_t, t, x_0))


# ---------------------------------------------------------------------------------------------
# Guidance as model-function wrappers


def original_steps(diffusion: Diffusion, t_model: Tensor) -> Tensor:
    """The original step indices ``[N]`` (int64) behind the timesteps a network was given.

    Inverts ``Diffusion.model_timesteps``: with ``rescale_timesteps`` the network sees
    t·1000/T_orig, which rounds back exactly.
    """
    if diffusion.rescale_timesteps:
        return torch.round(t_model.double() * (diffusion.original_num_steps / 1000.0)).long()
    return t_model.long()


def _alpha_bar_by_step(diffusion: Diffusion, device: torch.device) -> Tensor:
    """ᾱ indexed by original step ``[T_orig]`` (float64); NaN at steps the chain skips."""
    table = torch.full((diffusion.original_num_steps,), float("nan"), dtype=torch.float64)
    table[torch.from_numpy(diffusion.timestep_map)] = torch.from_numpy(diffusion.alphas_cumprod)
    return table.to(device)


def classifier_score_model(model_fn: ModelFn, cond_fn: CondFn, diffusion: Diffusion) -> ModelFn:
    """Classifier guidance through the score, for samplers that only read x̂_0 or ε̂.

    The new model function returns the network's output with its mean channels moved to
    ε̂ - √(1 - ᾱ_t) g (ADM Eq. 14, as dpm-solver applies it); an x_0-predicting network gets the
    same shift written for x̂_0: x̂_0 + (1 - ᾱ_t)/√ᾱ_t g. Learned-variance channels pass through.
    ``diffusion`` must hold every original step the sampler evaluates (the unrespaced chain
    always does). Unlike ``guided_score``, the shifted x̂_0 is clipped afterwards, by ``predict``.
    """
    if diffusion.mean_type == ModelMeanType.PREVIOUS_X:
        raise ValueError("guidance through the score needs an ε- or x_0-predicting model")
    tables: dict[torch.device, Tensor] = {}

    def guided(x: Tensor, t_model: Tensor, **model_kwargs: object) -> Tensor:
        output = model_fn(x, t_model, **model_kwargs).float()
        gradient = cond_fn(x, t_model, **model_kwargs).float()
        if x.device not in tables:
            tables[x.device] = _alpha_bar_by_step(diffusion, x.device)
        alpha_bar = tables[x.device][original_steps(diffusion, t_model)]
        if torch.isnan(alpha_bar).any():
            raise ValueError("the model was called at a step that the guidance chain lacks")
        alpha_bar = alpha_bar.float().view(-1, *([1] * (x.ndim - 1)))
        c = x.shape[1]
        if diffusion.mean_type == ModelMeanType.EPSILON:
            shift = -(1 - alpha_bar).sqrt() * gradient
        else:
            shift = (1 - alpha_bar) / alpha_bar.sqrt() * gradient
        return torch.cat([output[:, :c] + shift, output[:, c:]], dim=1)

    return guided


def classifier_free_model(model_fn: ModelFn, scale: float, null_label: int) -> ModelFn:
    """Classifier-free guidance: mean channels ε̂_∅ + w (ε̂_y - ε̂_∅) (Ho & Salimans 2022).

    The conditional and the null-label pass run as ONE batch of 2N (other keyword arguments,
    such as ``low_res``, are repeated for both halves). The combination is a linear
    interpolation, exact at w = 1 (the conditional output) and w = 0 (the unconditional one), and
    it holds for x_0-predicting networks too since ε̂ is affine in x̂_0 at fixed x_t. Learned
    variance channels come from the conditional branch.
    """

    def guided(
        x: Tensor, t_model: Tensor, y: Tensor | None = None, **model_kwargs: Tensor
    ) -> Tensor:
        if y is None:
            raise ValueError("classifier-free guidance needs class labels: pass y in model_kwargs")
        n, c = x.shape[:2]
        null = torch.full_like(y, null_label)
        doubled = {k: torch.cat([v, v]) for k, v in model_kwargs.items()}
        output = model_fn(
            torch.cat([x, x]), torch.cat([t_model, t_model]), y=torch.cat([y, null]), **doubled
        )
        conditional, unconditional = output[:n].float(), output[n:].float()
        # torch.lerp returns its end point exactly at weight 1, its start exactly at weight 0.
        mean = torch.lerp(unconditional[:, :c], conditional[:, :c], scale)
        return torch.cat([mean, conditional[:, c:]], dim=1)

    return guided


def guided_by_model(model_fn: ModelFn, guide_fn: ModelFn, scale: float) -> ModelFn:
    """Guidance by a second network: mean channels D_0 + w (D_1 - D_0) (Karras et al. 2024).

    ``model_fn`` (D_1) and ``guide_fn`` (D_0) are called on the same x_t, timesteps and keyword
    arguments (a guide that ignores labels, being unconditional, drops ``y`` itself). Both must
    predict the same quantity, ε̂ or x̂_0, of the same chain: the combination is then the same
    on either, since ε̂ is affine in x̂_0 at fixed x_t. The result is a linear interpolation,
    exact at w = 1 (D_1) and w = 0 (D_0); w > 1 extrapolates away from the guide's errors.
    Learned-variance channels come from D_1; the guide's, if any, are not used.
    """

    def guided(x: Tensor, t_model: Tensor, **model_kwargs: object) -> Tensor:
        c = x.shape[1]
        main = model_fn(x, t_model, **model_kwargs).float()
        guide = guide_fn(x, t_model, **model_kwargs).float()
        # torch.lerp returns its end point exactly at weight 1, its start exactly at weight 0.
        mean = torch.lerp(guide[:, :c], main[:, :c], scale)
        return torch.cat([mean, main[:, c:]], dim=1)

    return guided


def guidance_interval(
    guided: Callable[..., Tensor],
    unguided: Callable[..., Tensor],
    diffusion: Diffusion,
    t_lo: int,
    t_hi: int,
) -> Callable[..., Tensor]:
    """Use ``guided`` where the original step lies in [t_lo, t_hi], ``unguided`` elsewhere.

    Works for model functions (e.g. CFG against the plain conditional model) and condition
    functions alike (``unguided`` then returns zeros: see ``zero_cond_fn``); each is called only
    when some image of the batch needs it. Guiding only the middle noise levels is the finding of
    Kynkäänniemi et al. 2024.
    """
    if not 0 <= t_lo <= t_hi:
        raise ValueError(f"a guidance interval needs 0 <= t_lo <= t_hi, got [{t_lo}, {t_hi}]")

    def limited(x: Tensor, t_model: Tensor, **kwargs: object) -> Tensor:
        step = original_steps(diffusion, t_model)
        inside = (step >= t_lo) & (step <= t_hi)
        if bool(inside.all()):
            return guided(x, t_model, **kwargs)
        if not bool(inside.any()):
            return unguided(x, t_model, **kwargs)
        a, b = guided(x, t_model, **kwargs), unguided(x, t_model, **kwargs)
        return torch.where(inside.view(-1, *([1] * (a.ndim - 1))), a.float(), b.float())

    return limited


def zero_cond_fn(x: Tensor, t_model: Tensor, **_: object) -> Tensor:
    """The condition function of no guidance: g = 0."""
    return torch.zeros_like(x)


def dynamic_threshold(percentile: float = 0.995) -> Callable[[Tensor], Tensor]:
    """Imagen's dynamic thresholding of x̂_0 ``[N, C, H, W]``, as a ``denoised_fn``.

    Per image, s = max(1, the ``percentile`` quantile of abs(x̂_0)); x̂_0 is clipped to [-s, s]
    and divided by s, so saturated pixels are pushed inwards instead of piling up at ±1.
    """
    if not 0 < percentile <= 1:
        raise ValueError(f"the threshold percentile must lie in (0, 1], got {percentile}")

    def threshold(x_0: Tensor) -> Tensor:
        s = torch.quantile(x_0.flatten(1).abs().float(), percentile, dim=1)
        s = s.clamp(min=1.0).view(-1, *([1] * (x_0.ndim - 1))).to(x_0.dtype)
        return torch.maximum(torch.minimum(x_0, s), -s) / s

    return threshold
