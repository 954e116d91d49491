"""guided-diffusion's diffusion API (gaussian_diffusion.py, respace.py, resample.py) over admkit.

Downstream code written against guided-diffusion calls these names with the original arguments,
defaults and return dicts. The object holds one native ``admkit.diffusion.Diffusion`` (respaced
or not) and hands every method to the native functions; respacing is therefore composition, and
the model and ``cond_fn`` always receive the original step indices, as under ``SpacedDiffusion``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from admkit import diffusion as native
from admkit import losses, samplers, timestep_sampling
from admkit.diffusion import (
    DiffusionConfig,
    LossType,
    ModelMeanType,
    ModelVarType,
    Prediction,
    space_timesteps,
)
from admkit.errors import UserError
from admkit.guidance import guided_mean, guided_score

__all__ = [
    "GaussianDiffusion",
    "LossAwareSampler",
    "LossSecondMomentResampler",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "ScheduleSampler",
    "SpacedDiffusion",
    "UniformSampler",
    "create_gaussian_diffusion",
    "create_named_schedule_sampler",
    "get_named_beta_schedule",
    "space_timesteps",
]

_ARRAYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    return native.beta_schedule(schedule_name, num_diffusion_timesteps)


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: str = "",
) -> SpacedDiffusion:
    """guided-diffusion's factory: flags to enums (reference §4.3), always a SpacedDiffusion."""
    config = DiffusionConfig(
        diffusion_steps=steps,
        noise_schedule=noise_schedule,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        predict_xstart=predict_xstart,
        use_kl=use_kl,
        rescale_learned_sigmas=rescale_learned_sigmas,
        rescale_timesteps=rescale_timesteps,
    )
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing or [steps]),
        betas=get_named_beta_schedule(noise_schedule, steps),
        model_mean_type=config.mean_type,
        model_var_type=config.var_type,
        loss_type=config.loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def _as_dict(pred: Prediction) -> dict[str, Tensor]:
    return {
        "mean": pred.mean,
        "variance": pred.variance,
        "log_variance": pred.log_variance,
        "pred_xstart": pred.x_0,
    }


class GaussianDiffusion:
    """guided-diffusion's diffusion object; ``native`` is the ``admkit.diffusion.Diffusion``."""

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ):
        self._adopt(
            native.Diffusion(
                betas,
                mean_type=model_mean_type,
                var_type=model_var_type,
                loss_type=loss_type,
                rescale_timesteps=rescale_timesteps,
            )
        )

    def _adopt(self, diffusion: native.Diffusion) -> None:
        self.native = diffusion
        self.model_mean_type = diffusion.mean_type
        self.model_var_type = diffusion.var_type
        self.loss_type = diffusion.loss_type
        self.rescale_timesteps = diffusion.rescale_timesteps
        self.num_timesteps = diffusion.num_timesteps
        self.original_num_steps = diffusion.original_num_steps
        self.timestep_map = diffusion.timestep_map.tolist()
        for name in _ARRAYS:
            setattr(self, name, getattr(diffusion, name))

    # -- forward process -----------------------------------------------------------------

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.native.q_mean_variance(x_start, t)

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.native.q_sample(x_start, t, noise)

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        return self.native.q_posterior_mean_variance(x_start, x_t, t)

    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self.native.x0_from_eps(x_t, t, eps)

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        return self.native.eps_from_x0(x_t, t, pred_xstart)

    # -- reverse process -----------------------------------------------------------------

    def p_mean_variance(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None
    ) -> dict[str, Tensor]:
        pred = self.native.predict(
            model,
            x,
            t,
            model_kwargs=model_kwargs,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
        )
        return _as_dict(pred)

    def _prediction(self, p_mean_var: dict, x: Tensor, t: Tensor) -> Prediction:
        x_0 = p_mean_var["pred_xstart"]
        return Prediction(
            mean=p_mean_var["mean"],
            variance=p_mean_var["variance"],
            log_variance=p_mean_var["log_variance"],
            x_0=x_0,
            eps=self.native.eps_from_x0(x, t, x_0),
        )

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None) -> Tensor:
        gradient = cond_fn(x, self.native.model_timesteps(t), **(model_kwargs or {}))
        return guided_mean(self._prediction(p_mean_var, x, t), gradient).mean

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None) -> dict[str, Tensor]:
        gradient = cond_fn(x, self.native.model_timesteps(t), **(model_kwargs or {}))
        pred = guided_score(self.native, self._prediction(p_mean_var, x, t), x, t, gradient)
        out = dict(p_mean_var)
        out["pred_xstart"], out["mean"] = pred.x_0, pred.mean
        return out

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None
    ) -> dict[str, Tensor]:
        step = samplers.ddpm_step(
            self.native,
            model,
            x,
            t,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
        )
        return {"sample": step.sample, "pred_xstart": step.x_0}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ) -> Tensor:
        steps = self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress
        )
        return deque(steps, maxlen=1).pop()["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ) -> Iterator[dict[str, Tensor]]:
        def step(x: Tensor, t: Tensor) -> dict[str, Tensor]:
            return self.p_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs)

        yield from self._progressive(step, model, shape, noise, device, progress)

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
    ) -> dict[str, Tensor]:
        step = samplers.ddim_step(
            self.native,
            model,
            x,
            t,
            eta=eta,
            model_kwargs=model_kwargs,
            cond_fn=cond_fn,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
        )
        return {"sample": step.sample, "pred_xstart": step.x_0}

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
    ) -> dict[str, Tensor]:
        if eta != 0.0:
            raise ValueError("Reverse ODE only for deterministic path")
        step = samplers.ddim_reverse_step(
            self.native,
            model,
            x,
            t,
            model_kwargs=model_kwargs,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
        )
        return {"sample": step.sample, "pred_xstart": step.x_0}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ) -> Tensor:
        steps = self.ddim_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            cond_fn,
            model_kwargs,
            device,
            progress,
            eta,
        )
        return deque(steps, maxlen=1).pop()["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ) -> Iterator[dict[str, Tensor]]:
        def step(x: Tensor, t: Tensor) -> dict[str, Tensor]:
            return self.ddim_sample(
                model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta
            )

        yield from self._progressive(step, model, shape, noise, device, progress)

    def _progressive(
        self,
        step: Callable[[Tensor, Tensor], dict[str, Tensor]],
        model,
        shape,
        noise: Tensor | None,
        device,
        progress: bool,
    ) -> Iterator[dict[str, Tensor]]:
        if device is None:
            device = next(model.parameters()).device
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        x = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        for i in tqdm(indices) if progress else indices:
            t = torch.tensor([i] * shape[0], device=device)
            with torch.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]

    # -- losses and likelihood -----------------------------------------------------------

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        return losses.training_losses(
            self.native, model, x_start, t, model_kwargs=model_kwargs, noise=noise
        )

    def _vb_terms_bpd(
        self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None
    ) -> dict[str, Tensor]:
        output = model(x_t, self.native.model_timesteps(t), **(model_kwargs or {}))
        bpd, pred = losses.vb_terms_bpd(
            self.native, output, x_start, x_t, t, clip_denoised=clip_denoised
        )
        return {"output": bpd, "pred_xstart": pred.x_0}

    def _prior_bpd(self, x_start: Tensor) -> Tensor:
        return losses.prior_bpd(self.native, x_start)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None) -> dict:
        return losses.calc_bpd_loop(
            self.native, model, x_start, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept steps ``use_timesteps`` of the chain given by ``betas``."""

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        super().__init__(**kwargs)
        self.use_timesteps = set(use_timesteps)
        self._adopt(native.respace(self.native, self.use_timesteps))


# -- timestep samplers (resample.py) ------------------------------------------------------

ScheduleSampler = timestep_sampling.ScheduleSampler
LossAwareSampler = timestep_sampling.LossAwareSampler


class UniformSampler(timestep_sampling.UniformSampler):
    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__(diffusion.num_timesteps)
        self.diffusion = diffusion


class LossSecondMomentResampler(timestep_sampling.LossSecondMomentResampler):
    def __init__(
        self, diffusion: GaussianDiffusion, history_per_term: int = 10, uniform_prob: float = 0.001
    ):
        super().__init__(diffusion.num_timesteps, history_per_term, uniform_prob)
        self.diffusion = diffusion


def create_named_schedule_sampler(name: str, diffusion: GaussianDiffusion) -> ScheduleSampler:
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise UserError(f"unknown schedule sampler: {name!r}; use 'uniform' or 'loss-second-moment'")
