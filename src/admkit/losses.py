"""Training losses and the variational bound, in bits per dimension (reference §4.6-4.7).

Notation and the model-function contract are those of ``admkit.diffusion``. L_simple is the
mean squared error of the network's mean channels against their target (ε, x_0 or μ̃_t);
L_vlb = L_0 + Σ_t L_{t-1} + L_T is DDPM's bound (Eq. 5), each term a KL between Gaussians
except the discretised decoder term L_0; L_hybrid = L_simple + λ L_vlb (IDDPM Eq. 16).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from admkit.diffusion import Diffusion, LossType, ModelFn, ModelMeanType, ModelVarType, Prediction
from admkit.noise import Generator, randn_like


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``[N, ...]`` -> ``[N]``."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(
    mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float, logvar2: Tensor | float
) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats, elementwise; scalars broadcast."""
    like = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, Tensor)), None)
    if like is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        x if isinstance(x, Tensor) else torch.tensor(x).to(like) for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) by the tanh approximation used by the original (accurate to about 1e-3)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) per element for 8-bit data in [-1, 1] under N(means, e^(2 log_scales)).

    Each of the 256 values owns a bin of half-width 1/255 (DDPM Eq. 13); the two edge bins run
    to -∞ and +∞ so the probabilities of all 256 values sum to one.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def vb_terms_bpd(
    diffusion: Diffusion,
    output: Tensor,
    x_0: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    clip_denoised: bool = True,
) -> tuple[Tensor, Prediction]:
    """One term of L_vlb per example, in bits per dimension, from a network ``output``.

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)) for t > 0, and the decoder term
    L_0 = -log p_θ(x_0 | x_1) at t = 0 (DDPM Eq. 5). Returns ``([N], prediction)``.
    """
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x_0, x_t, t)
    pred = diffusion.p_mean_variance(output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, pred.mean, pred.log_variance))
    decoder_nll = -discretized_gaussian_log_likelihood(
        x_0, means=pred.mean, log_scales=0.5 * pred.log_variance
    )
    decoder_nll = mean_flat(decoder_nll)
    return torch.where(t == 0, decoder_nll, kl) / math.log(2.0), pred


def prior_bpd(diffusion: Diffusion, x_0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, ``[N]``; no model involved."""
    t = torch.full((x_0.shape[0],), diffusion.num_timesteps - 1, device=x_0.device)
    mean, _, log_variance = diffusion.q_mean_variance(x_0, t)
    return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)


def training_losses(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_0: Tensor,
    t: Tensor,
    *,
    model_kwargs: dict | None = None,
    noise: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-example losses ``[N]`` at chain indices t, as ``diffusion.loss_type`` asks (§4.6).

    Keys: ``loss`` for the KL types; ``mse``, ``vb``, ``loss`` for MSE with learned Σ
    (L_hybrid, IDDPM Eq. 16); ``mse``, ``loss`` otherwise. ``noise`` is ε, drawn when None.
    """
    if noise is None:
        noise = torch.randn_like(x_0)
    x_t = diffusion.q_sample(x_0, t, noise)
    output = model_fn(x_t, diffusion.model_timesteps(t), **(model_kwargs or {}))
    losses: dict[str, Tensor] = {}
    if diffusion.loss_type.is_vb():
        losses["loss"], _ = vb_terms_bpd(diffusion, output, x_0, x_t, t, clip_denoised=False)
        if diffusion.loss_type == LossType.RESCALED_KL:
            losses["loss"] = losses["loss"] * diffusion.num_timesteps
        return losses

    c = x_t.shape[1]
    if diffusion.var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
        if output.shape[1] != 2 * c:
            raise ValueError(f"a learned-variance model must output {2 * c} channels")
        output, v = torch.split(output, c, dim=1)
        # L_hybrid: the VLB term trains only Σ_θ, so the mean sees it through a stop-gradient
        # and L_simple alone shapes μ_θ (IDDPM §3.1). The λ = 0.001 of the paper is this
        # per-step term with weight T/1000 (= 1 at T = 1000, factor only for RESCALED_MSE).
        frozen = torch.cat([output.detach(), v], dim=1)
        losses["vb"], _ = vb_terms_bpd(diffusion, frozen, x_0, x_t, t, clip_denoised=False)
        if diffusion.loss_type == LossType.RESCALED_MSE:
            losses["vb"] = losses["vb"] * (diffusion.num_timesteps / 1000.0)

    if diffusion.mean_type == ModelMeanType.PREVIOUS_X:
        target, _, _ = diffusion.q_posterior_mean_variance(x_0, x_t, t)
    elif diffusion.mean_type == ModelMeanType.START_X:
        target = x_0
    else:
        target = noise
    if output.shape != x_0.shape:
        raise ValueError(
            f"model output {tuple(output.shape)} does not match x_0 {tuple(x_0.shape)}"
        )
    losses["mse"] = mean_flat((target - output) ** 2)
    losses["loss"] = losses["mse"] + losses["vb"] if "vb" in losses else losses["mse"]
    return losses


@torch.no_grad()
def calc_bpd_loop(
    diffusion: Diffusion,
    model_fn: ModelFn,
    x_0: Tensor,
    *,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    generator: Generator = None,
) -> dict[str, Tensor]:
    """The full variational bound of x_0 ``[N, C, H, W]`` in bits per dimension (§4.7).

    Returns ``total_bpd`` and ``prior_bpd`` ``[N]``, and per-step ``vb``, ``xstart_mse`` and
    ``mse`` (ε) ``[N, T]`` whose column 0 is t = T-1 (loop order, as the original; quirk §12.19).
    ``generator`` (one per image, or one for all) draws the noise of each step.
    """
    vb, xstart_mse, mse = [], [], []
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x_0.shape[0],), i, device=x_0.device, dtype=torch.long)
        noise = randn_like(x_0, generator)
        x_t = diffusion.q_sample(x_0, t, noise)
        output = model_fn(x_t, diffusion.model_timesteps(t), **(model_kwargs or {}))
        bpd, pred = vb_terms_bpd(diffusion, output, x_0, x_t, t, clip_denoised=clip_denoised)
        vb.append(bpd)
        xstart_mse.append(mean_flat((pred.x_0 - x_0) ** 2))
        mse.append(mean_flat((diffusion.eps_from_x0(x_t, t, pred.x_0) - noise) ** 2))
    vb_per_step = torch.stack(vb, dim=1)
    prior = prior_bpd(diffusion, x_0)
    return {
        "total_bpd": vb_per_step.sum(dim=1) + prior,
        "prior_bpd": prior,
        "vb": vb_per_step,
        "xstart_mse": torch.stack(xstart_mse, dim=1),
        "mse": torch.stack(mse, dim=1),
    }
