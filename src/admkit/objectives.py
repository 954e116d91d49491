"""Training objectives: the loss functions that ``admkit.train.train`` optimises.

``train`` does not know what it trains; it calls ``loss_fn(model, batch, generators)`` and gets
per-example terms back (``loss`` and whatever else is logged). The objectives of the three
training commands live here, so a Python caller trains the same way the command line does.

Notation (guided-diffusion's, reference §4 and §6):

| symbol | code | meaning |
| --- | --- | --- |
| x_0 | ``x_0`` | a batch of training images ``[n, 3, S, S]`` in [−1, 1] |
| y | ``y`` | their labels ``[n]``; K real classes, K itself is the null label of CFG |
| t, T | ``t``, ``num_timesteps`` | chain index ``[n]`` drawn from p_t, chain length |
| w_t | ``weight`` | importance weight 1/(T p_t) (all 1 for the uniform sampler) |
| ε | ``noise`` | standard normal noise, x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε |
| p_uncond | ``cfg_dropout`` | probability that y is replaced by the null label K |

Every random number of a training example (t, ε, the label drop, the low-res noise) is drawn,
in a fixed order, from that example's own generator, which the loop seeds by (seed, step, index
of the example in the global batch). An example therefore draws the same numbers whichever
process and micro-batch it lands in, and a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from admkit import losses
from admkit.data import augment_low_res, make_low_res
from admkit.diffusion import Diffusion
from admkit.noise import Generator, rand, randn
from admkit.timestep_sampling import LossAwareSampler, ScheduleSampler


class DiffusionLoss:
    """Per-example diffusion loss (L_simple or L_hybrid) at t ~ p_t, for ``admkit.train``.

    ``small_size`` makes it an upsampler's loss: the model also gets ``low_res``, the batch
    area-downsampled to ``small_size`` (guided-diffusion's recipe), blurred by ``lowres_blur``
    and noised by ``lowres_noise`` (beyond the original). With ``null_label`` (= K) each label
    is replaced by it with probability ``cfg_dropout``.
    """

    def __init__(
        self,
        diffusion: Diffusion,
        sampler: ScheduleSampler,
        *,
        class_cond: bool,
        cfg_dropout: float = 0.0,
        null_label: int | None = None,
        small_size: int | None = None,
        lowres_noise: float = 0.0,
        lowres_blur: float = 0.0,
    ) -> None:
        if cfg_dropout > 0 and null_label is None:
            raise ValueError("cfg_dropout needs a null_label")
        self.diffusion = diffusion
        self.sampler = sampler
        self.class_cond = class_cond
        self.cfg_dropout = cfg_dropout
        self.null_label = null_label
        self.small_size = small_size
        self.lowres_noise = lowres_noise
        self.lowres_blur = lowres_blur

    def __call__(self, model: torch.nn.Module, batch: Any, generators: Generator) -> dict[str, Any]:
        """Terms ``[n]``: loss, mse (and vb), weight w_t, t; batch = (x_0 [n, 3, S, S], y [n]);
        ``generators``: one per example (or one for all, or None for torch's global one)."""
        x_0, y = batch
        n, device = x_0.shape[0], x_0.device
        # The order of the draws is part of the contract: resumed runs replay it exactly.
        t, weight = self.sampler.sample(n, device, rng=generators)
        noise = randn(x_0.shape, generator=generators, device=device, dtype=x_0.dtype)
        model_kwargs = {}
        if self.class_cond:
            if self.cfg_dropout > 0:
                drop = rand(n, generator=generators, device=device) < self.cfg_dropout
                y = torch.where(drop, torch.full_like(y, self.null_label), y)
            model_kwargs["y"] = y
        if self.small_size is not None:
            low_res = make_low_res(x_0, self.small_size)
            model_kwargs["low_res"] = augment_low_res(
                low_res,
                blur_sigma=self.lowres_blur,
                noise_std=self.lowres_noise,
                generator=generators,
            )
        terms = losses.training_losses(
            self.diffusion, model, x_0, t, model_kwargs=model_kwargs, noise=noise
        )
        return {**terms, "weight": weight, "t": t, "num_timesteps": self.diffusion.num_timesteps}

    def observe(self, terms: Mapping[str, Any]) -> None:
        """Feed a loss-aware sampler the global batch's unweighted losses (already gathered)."""
        if isinstance(self.sampler, LossAwareSampler):
            self.sampler.update_with_all_losses(terms["t"].tolist(), terms["loss"].tolist())

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else None

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.sampler.load_state_dict(state)


def topk_hits(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 where y is among the k largest logits: ``[n, K]``, ``[n]`` -> float ``[n]``."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == y[:, None]).any(dim=1).float()


class ClassifierLoss:
    """Cross-entropy of the noise-aware classifier p_φ(y | x_t, t) (reference §6.6).

    With ``diffusion`` (``--noised True``) x_t = q_sample(x_0, t) at t uniform in [0, T); the
    network gets t itself, the ORIGINAL step index, with no respacing or rescaling, as the
    original trains it. Without, x_t = x_0 and t = 0.
    """

    def __init__(self, diffusion: Diffusion | None) -> None:
        if diffusion is not None and diffusion.num_timesteps != diffusion.original_num_steps:
            raise ValueError("train the classifier on the full chain, not a respaced one")
        self.diffusion = diffusion

    def __call__(self, model: torch.nn.Module, batch: Any, generators: Generator) -> dict[str, Any]:
        """Terms ``[n]``: loss, acc@1, acc@5 (and t); batch = (x_0 [n, 3, S, S], y [n]);
        ``generators`` as for :class:`DiffusionLoss`."""
        x_0, y = batch
        n, device = x_0.shape[0], x_0.device
        terms: dict[str, Any] = {}
        if self.diffusion is not None:
            T = self.diffusion.num_timesteps
            t = (rand(n, generator=generators, device=device, dtype=torch.float64) * T).long()
            noise = randn(x_0.shape, generator=generators, device=device, dtype=x_0.dtype)
            x_t = self.diffusion.q_sample(x_0, t, noise)
            terms |= {"t": t, "num_timesteps": T}
        else:
            t = torch.zeros(n, dtype=torch.long, device=device)
            x_t = x_0
        logits = model(x_t, t).float()
        terms["loss"] = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        terms["acc@1"] = topk_hits(logits.detach(), y, 1)
        terms["acc@5"] = topk_hits(logits.detach(), y, 5)
        return terms
