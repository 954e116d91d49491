"""Classifier guidance (ADM §4): the classifier gradient and how it enters a reverse step.

Notation as in ``admkit.diffusion``; s is the guidance scale, y the class, p_φ the noise-aware
classifier. A *condition function* ``cond_fn(x_t, t_model, **model_kwargs) -> g`` returns
g = s·∇_{x_t} log p_φ(y | x_t) ``[N, C, H, W]``, the scale already folded in; it receives the
same timesteps as the network (``Diffusion.model_timesteps``: original step indices of a
respaced chain) and the same keyword arguments (``y`` among them).

It enters a step in one of two ways, both evaluated at x_t (ADM Algs. 1 and 2):

* ``guided_mean`` (ancestral sampling, Alg. 1): μ ← μ_θ + Σ_θ g;
* ``guided_score`` (DDIM, Alg. 2): ε̂ ← ε̂ - √(1 - ᾱ_t) g, then x̂_0 and μ from the new ε̂.

Guidance that changes the model itself (classifier-free guidance) belongs here too, as a wrapper
that returns a new model function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from admkit.diffusion import Diffusion, Prediction

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
