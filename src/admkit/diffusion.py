"""Gaussian diffusion: beta schedules, respacing, the forward process, parameterisations.

Notation (DDPM = Ho et al. 2020; IDDPM = Nichol & Dhariwal 2021; ADM = Dhariwal & Nichol 2021):

| symbol             | code                   | meaning                                       |
| ------------------ | ---------------------- | --------------------------------------------- |
| T                  | num_timesteps          | steps of this (possibly respaced) chain       |
| t                  | t                      | chain index 0..T-1, one per image, ``[N]``    |
| β_t, α_t = 1 - β_t | betas, alphas          | noise schedule                                |
| ᾱ_t = Π_s≤t α_s    | alphas_cumprod         | signal kept at step t; ᾱ_{-1} = 1, ᾱ_T = 0    |
| x_0, x_t, ε        | x_0, x_t, eps          | data, noised data, standard normal noise      |
| μ̃_t, β̃_t           | posterior_*            | mean, variance of q(x_{t-1} given x_t, x_0)   |
| μ_θ, Σ_θ           | Prediction.mean, ...   | the model's reverse step p(x_{t-1} given x_t) |
| x̂_0, ε̂             | Prediction.x_0, .eps   | the model's estimates of x_0 and ε            |
| v                  | v                      | learned-range output, Σ_θ between β̃ and β     |

The model function. Everything here that runs a network takes ``model_fn(x_t, t_model,
**model_kwargs) -> output``, e.g. an ``admkit.unet`` module or a wrapper around one (guidance).
``t_model = diffusion.model_timesteps(t)`` is what the network was trained on: the ORIGINAL step
index of a respaced chain, times 1000/T_orig when ``rescale_timesteps``. ``output`` is
``[N, C, ...]`` holding ε, x_0 or x_{t-1} (``mean_type``), or ``[N, 2C, ...]`` with v appended
when the variance is learned. ``Diffusion.predict`` runs the model and turns its output into a
``Prediction`` (μ_θ, Σ_θ, x̂_0, ε̂) at a chain index; samplers (``admkit.samplers``) and guidance
(``admkit.guidance``) build only on that and on the ᾱ arrays; ``admkit.losses`` holds the
training losses and the variational bound.

Arrays are float64 numpy, as in guided-diffusion; each lookup takes the float64 value at t and
converts it to float32, so every tensor operation runs in float32 exactly like the original and
numbers agree with it (reference §4.2).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from admkit.errors import UserError

ModelFn = Callable[..., Tensor]


class ModelMeanType(enum.Enum):
    """What the mean channels of the network predict."""

    PREVIOUS_X = enum.auto()  # μ_θ = x_{t-1} directly
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # ε (DDPM Eq. 11)


class ModelVarType(enum.Enum):
    """How Σ_θ is obtained; FIXED_* use no network output, LEARNED_* read v."""

    LEARNED = enum.auto()  # v = log Σ
    FIXED_SMALL = enum.auto()  # Σ = β̃_t
    FIXED_LARGE = enum.auto()  # Σ = β_t
    LEARNED_RANGE = enum.auto()  # IDDPM Eq. 15


class LossType(enum.Enum):
    MSE = enum.auto()  # L_simple (+ the VLB term for learned Σ: L_hybrid)
    RESCALED_MSE = enum.auto()  # as MSE, the VLB term times T/1000
    KL = enum.auto()  # L_vlb, one term per example
    RESCALED_KL = enum.auto()  # L_vlb times T

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


class SpacingError(UserError, ValueError):
    """A timestep respacing string that cannot be met (a ValueError, as in guided-diffusion)."""


# ---------------------------------------------------------------------------------------------
# Schedules and respacing


def betas_for_alpha_bar(
    num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta) for a continuous ᾱ on [0, 1]; float64 [T]."""
    betas = []
    for i in range(num_steps):
        t1, t2 = i / num_steps, (i + 1) / num_steps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """The named β schedule (reference §4.1), float64 ``[num_steps]``."""
    if num_steps < 2:
        raise UserError(f"diffusion_steps must be at least 2, got {num_steps}")
    if name == "linear":
        if num_steps <= 20:
            # β_{T-1} = 20/T reaches 1 and ᾱ_{T-1} vanishes: x_0 could not be recovered.
            raise UserError(
                f"the linear schedule needs more than 20 diffusion steps, got {num_steps}; "
                "use more steps, or respace a longer chain with --timestep_respacing"
            )
        # DDPM's 1e-4..0.02 at T=1000, stretched so that other T give the same curve.
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        # IDDPM Eq. 17 with s = 0.008; the ratio needs no division by ᾱ(0).
        return betas_for_alpha_bar(
            num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise UserError(f"unknown beta schedule: {name!r}; use 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | Iterable[int]) -> set[int]:
    """The original step indices kept by a respacing string (reference §5.1).

    ``"ddimN"`` takes every k-th step for the smallest integer stride k giving N steps. Otherwise
    the chain is cut into equal sections (earlier ones one step longer when T does not divide)
    and each section's count is spread over it with an accumulated float stride and Python's
    round-half-to-even, exactly as guided-diffusion does, so e.g. "250" keeps 0, 4, ..., 164, 169.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = _parse_count(section_counts[len("ddim") :], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            # The first clause is guided-diffusion's message, quirk included (it names T).
            raise SpacingError(
                f"cannot create exactly {num_timesteps} steps with an integer stride "
                f"({section_counts!r} of {num_timesteps} steps; use a plain count such as "
                f"'{desired}' instead)"
            )
        section_counts = [_parse_count(part, section_counts) for part in section_counts.split(",")]
    section_counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise SpacingError(f"cannot divide section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac_stride
        start += size
    if not kept:
        raise SpacingError(f"timestep respacing {section_counts!r} keeps no steps; ask for some")
    return set(kept)


def _parse_count(text: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SpacingError(
            f"timestep respacing {whole!r} is not understood; use a step count ('250'), "
            "'ddimN' ('ddim25') or comma-separated counts per section ('10,15,20')"
        ) from None


@dataclass(frozen=True)
class DiffusionConfig:
    """guided-diffusion's diffusion flags (reference §1.2) as one typed value."""

    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    timestep_respacing: str = ""
    learn_sigma: bool = False
    sigma_small: bool = False
    predict_xstart: bool = False
    use_kl: bool = False
    rescale_learned_sigmas: bool = False
    rescale_timesteps: bool = False

    @property
    def mean_type(self) -> ModelMeanType:
        return ModelMeanType.START_X if self.predict_xstart else ModelMeanType.EPSILON

    @property
    def var_type(self) -> ModelVarType:
        if self.learn_sigma:
            return ModelVarType.LEARNED_RANGE
        return ModelVarType.FIXED_SMALL if self.sigma_small else ModelVarType.FIXED_LARGE

    @property
    def loss_type(self) -> LossType:
        if self.use_kl:
            return LossType.RESCALED_KL
        return LossType.RESCALED_MSE if self.rescale_learned_sigmas else LossType.MSE


# ---------------------------------------------------------------------------------------------
# The process


@dataclass(frozen=True)
class Prediction:
    """The model's reverse step at (x_t, t); every tensor ``[N, C, H, W]``."""

    mean: Tensor  # μ_θ
    variance: Tensor  # Σ_θ
    log_variance: Tensor  # log Σ_θ
    x_0: Tensor  # x̂_0, after denoised_fn and clipping
    eps: Tensor  # ε̂ recomputed from x̂_0, the ε that DDIM uses


class Diffusion:
    """One Gaussian diffusion chain: its float64 arrays and the process math over them.

    ``timestep_map[i]`` is the original step index of chain index i (identity unless respaced,
    see ``respace``); ``original_num_steps`` is the length of the chain the network was trained
    on. Build one with ``Diffusion.from_config`` or from explicit betas.
    """

    def __init__(
        self,
        betas: np.ndarray,
        *,
        mean_type: ModelMeanType = ModelMeanType.EPSILON,
        var_type: ModelVarType = ModelVarType.FIXED_LARGE,
        loss_type: LossType = LossType.MSE,
        rescale_timesteps: bool = False,
        timestep_map: Iterable[int] | None = None,
        original_num_steps: int | None = None,
    ):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be one-dimensional with 0 < β ≤ 1")
        if len(betas) < 2:
            raise UserError(f"a diffusion needs at least 2 steps, got {len(betas)}")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.rescale_timesteps = rescale_timesteps
        self.num_timesteps = len(betas)
        self.timestep_map = np.array(
            range(len(betas)) if timestep_map is None else list(timestep_map), dtype=np.int64
        )
        self.original_num_steps = original_num_steps or len(betas)

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # β̃_t (DDPM Eq. 7); it is 0 at t = 0, so its log takes index 1's value there.
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef2_over_coef1 = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self.log_betas = np.log(betas)
        # Σ = β_t, except at t = 0 where β̃_1 stands in (a better decoder variance; quirk §12.10).
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._tables: dict[tuple[str, torch.device], Tensor] = {}

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> Diffusion:
        betas = beta_schedule(config.noise_schedule, config.diffusion_steps)
        diffusion = cls(
            betas,
            mean_type=config.mean_type,
            var_type=config.var_type,
            loss_type=config.loss_type,
            rescale_timesteps=config.rescale_timesteps,
        )
        if config.timestep_respacing:
            kept = space_timesteps(config.diffusion_steps, config.timestep_respacing)
            diffusion = respace(diffusion, kept)
        return diffusion

    def __repr__(self) -> str:
        return (
            f"Diffusion(T={self.num_timesteps} of {self.original_num_steps}, "
            f"{self.mean_type.name}, {self.var_type.name}, {self.loss_type.name})"
        )

    # -- lookups ---------------------------------------------------------------------------

    def gather(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """Array ``name`` at each t, float32 ``[N, 1, ...]`` with ``ndim`` dims for broadcasting."""
        table = self._tables.get((name, t.device))
        if table is None:
            # float64 tables do not exist on MPS; index on the CPU there.
            home = t.device if t.device.type != "mps" else torch.device("cpu")
            table = torch.from_numpy(getattr(self, name)).to(home)
            self._tables[(name, t.device)] = table
        values = table[t.to(table.device)].float().to(t.device)
        return values.view(-1, *([1] * (ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timesteps the network sees for chain indices t (reference §5.2).

        Original step indices (same integer dtype as t), or, with ``rescale_timesteps``, those
        times 1000/T_orig as float32 so every T looks like a 1000-step chain to the network.
        """
        mapped = torch.from_numpy(self.timestep_map).to(device=t.device, dtype=t.dtype)[t]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_steps)
        return mapped

    # -- forward process q ---------------------------------------------------------------

    def q_mean_variance(self, x_0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I)."""
        mean = self.gather("sqrt_alphas_cumprod", t, x_0.ndim) * x_0
        variance = self.gather("one_minus_alphas_cumprod", t, x_0.ndim).expand(x_0.shape)
        log_variance = self.gather("log_one_minus_alphas_cumprod", t, x_0.ndim).expand(x_0.shape)
        return mean, variance, log_variance

    def q_sample(self, x_0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε (DDPM Eq. 4); ``noise`` is ε, drawn when None."""
        if noise is None:
            noise = torch.randn_like(x_0)
        if noise.shape != x_0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} and x_0 {tuple(x_0.shape)} differ")
        return (
            self.gather("sqrt_alphas_cumprod", t, x_0.ndim) * x_0
            + self.gather("sqrt_one_minus_alphas_cumprod", t, x_0.ndim) * noise
        )

    def q_posterior_mean_variance(
        self, x_0: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """μ̃_t(x_t, x_0), β̃_t and clipped log β̃_t of q(x_{t-1} | x_t, x_0) (DDPM Eqs. 6-7)."""
        mean = (
            self.gather("posterior_mean_coef1", t, x_t.ndim) * x_0
            + self.gather("posterior_mean_coef2", t, x_t.ndim) * x_t
        )
        variance = self.gather("posterior_variance", t, x_t.ndim).expand(x_t.shape)
        log_variance = self.gather("posterior_log_variance_clipped", t, x_t.ndim).expand(x_t.shape)
        return mean, variance, log_variance

    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x̂_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t, written as √(1/ᾱ) x_t - √(1/ᾱ - 1) ε."""
        return (
            self.gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - self.gather("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
        )

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x_0: Tensor) -> Tensor:
        """ε̂ = (√(1/ᾱ_t) x_t - x_0) / √(1/ᾱ_t - 1), the inverse of ``x0_from_eps``."""
        return (self.gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - x_0) / self.gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t.ndim
        )

    def x0_from_x_prev(self, x_t: Tensor, t: Tensor, x_prev: Tensor) -> Tensor:
        """x_0 solved from μ̃_t = coef1·x_0 + coef2·x_t with μ̃_t = x_{t-1}."""
        return (
            self.gather("recip_posterior_mean_coef1", t, x_t.ndim) * x_prev
            - self.gather("posterior_mean_coef2_over_coef1", t, x_t.ndim) * x_t
        )

    # -- reverse process p ---------------------------------------------------------------

    def p_mean_variance(
        self,
        output: Tensor,
        x_t: Tensor,
        t: Tensor,
        *,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Prediction:
        """Turn a network ``output`` at (x_t, t) into μ_θ, Σ_θ, x̂_0, ε̂ (reference §4.5).

        ``denoised_fn`` then clipping to [-1, 1] apply to x̂_0 before μ_θ is formed from it.
        """
        n, c = x_t.shape[:2]
        if self.var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if tuple(output.shape) != (n, 2 * c, *x_t.shape[2:]):
                raise ValueError(
                    f"a learned-variance model must output {2 * c} channels for x_t of "
                    f"{tuple(x_t.shape)}, got {tuple(output.shape)}"
                )
            output, v = torch.split(output, c, dim=1)
            if self.var_type == ModelVarType.LEARNED:
                log_variance = v
            else:
                # IDDPM Eq. 15 with v in [-1, 1] mapped to [0, 1]; v is not clamped (quirk §12.9).
                min_log = self.gather("posterior_log_variance_clipped", t, x_t.ndim)
                max_log = self.gather("log_betas", t, x_t.ndim)
                frac = (v + 1) / 2
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.var_type == ModelVarType.FIXED_LARGE:
                names = ("fixed_large_variance", "fixed_large_log_variance")
            else:
                names = ("posterior_variance", "posterior_log_variance_clipped")
            variance = self.gather(names[0], t, x_t.ndim).expand(x_t.shape)
            log_variance = self.gather(names[1], t, x_t.ndim).expand(x_t.shape)

        def process(x_0: Tensor) -> Tensor:
            if denoised_fn is not None:
                x_0 = denoised_fn(x_0)
            return x_0.clamp(-1, 1) if clip_denoised else x_0

        if self.mean_type == ModelMeanType.PREVIOUS_X:
            x_0 = process(self.x0_from_x_prev(x_t, t, output))
            mean = output
        else:
            if self.mean_type == ModelMeanType.START_X:
                x_0 = process(output)
            else:
                x_0 = process(self.x0_from_eps(x_t, t, output))
            mean, _, _ = self.q_posterior_mean_variance(x_0, x_t, t)
        eps = self.eps_from_x0(x_t, t, x_0)
        return Prediction(mean=mean, variance=variance, log_variance=log_variance, x_0=x_0, eps=eps)

    def predict(
        self,
        model_fn: ModelFn,
        x_t: Tensor,
        t: Tensor,
        *,
        model_kwargs: dict | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Prediction:
        """Run the model at chain indices t ``[N]`` on x_t ``[N, C, H, W]``; see the module doc."""
        if tuple(t.shape) != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},), got {tuple(t.shape)}")
        output = model_fn(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance(
            output, x_t, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
        )


def respace(diffusion: Diffusion, use_timesteps: Iterable[int]) -> Diffusion:
    """A shorter chain through the kept steps, with the same ᾱ there (reference §5.2).

    Each kept step i gets β = 1 - ᾱ_i / ᾱ_(previous kept step), so the new chain's ᾱ equals the
    old one at the kept indices; ``timestep_map`` records the original indices the network sees.
    """
    kept = set(int(i) for i in use_timesteps)
    if not kept or min(kept) < 0 or max(kept) >= diffusion.num_timesteps:
        raise ValueError(f"kept steps must lie in [0, {diffusion.num_timesteps}), got {kept}")
    betas, timestep_map = [], []
    last_alpha_bar = 1.0
    for i, alpha_bar in enumerate(diffusion.alphas_cumprod):
        if i in kept:
            betas.append(1 - alpha_bar / last_alpha_bar)
            last_alpha_bar = alpha_bar
            timestep_map.append(int(diffusion.timestep_map[i]))
    return Diffusion(
        np.array(betas),
        mean_type=diffusion.mean_type,
        var_type=diffusion.var_type,
        loss_type=diffusion.loss_type,
        rescale_timesteps=diffusion.rescale_timesteps,
        timestep_map=timestep_map,
        original_num_steps=diffusion.original_num_steps,
    )
