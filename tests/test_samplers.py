"""Samplers and guidance against closed forms for Gaussian data.

For x_0 ~ N(μ, s²) per dimension, x_t = a x_0 + b ε with a = √ᾱ, b = √(1 - ᾱ) is Gaussian, and
the optimal noise predictor is E[ε | x_t] = b (x_t - a μ) / (a² s² + b²). With it every DDIM and
DDPM step is affine in x_t, so the distribution each sampler must produce is known exactly; the
tests compute it here from β and ᾱ alone.
"""

import math

import numpy as np
import pytest
import torch

from admkit.diffusion import Diffusion, DiffusionConfig
from admkit.guidance import classifier_grad_fn
from admkit.noise import randn
from admkit.samplers import (
    SAMPLERS,
    ddim_invert,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
)

MU = torch.tensor([0.3, -0.4]).view(1, 2, 1, 1)
S = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1)
BASE = Diffusion.from_config(DiffusionConfig())


def optimal_eps(x: torch.Tensor, t_model: torch.Tensor, **_) -> torch.Tensor:
    """E[ε | x_t] for Gaussian data; t_model is an ORIGINAL step index (of the 1000-step chain)."""
    a2 = torch.from_numpy(BASE.alphas_cumprod)[t_model].float().view(-1, 1, 1, 1)
    a, b = a2.sqrt(), (1 - a2).sqrt()
    return b / (a2 * S**2 + b**2) * (x - a * MU)


def _respaced(spacing: str) -> Diffusion:
    return Diffusion.from_config(DiffusionConfig(timestep_respacing=spacing))


def _ddim_moments(d: Diffusion, eta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std of DDIM(η) samples from x_T ~ N(0, I), and the product of the step gains.

    Each step is x' = a' x̂_0 + √(b'² - σ²) ε̂ + σ z with σ of DDIM Eq. 16, so x' - a'μ =
    k (x - aμ) + σ z with k = (a' a s² + √(b'² - σ²) b) / (a² s² + b²).
    """
    mu, s2 = MU.flatten().double().numpy(), S.flatten().double().numpy() ** 2
    offset, var, gain = -math.sqrt(d.alphas_cumprod[-1]) * mu, np.ones(2), np.ones(2)
    for i in reversed(range(d.num_timesteps)):
        ab, ab_prev = d.alphas_cumprod[i], d.alphas_cumprod_prev[i]
        sigma2 = eta**2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev) if i > 0 else 0.0
        a, b, a_prev = math.sqrt(ab), math.sqrt(1 - ab), math.sqrt(ab_prev)
        k = (a_prev * a * s2 + math.sqrt(1 - ab_prev - sigma2) * b) / (ab * s2 + 1 - ab)
        offset, var, gain = k * offset, k**2 * var + sigma2, k * gain
    return mu + offset, np.sqrt(var), gain


def _ddpm_moments(d: Diffusion) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of ancestral samples from x_T ~ N(0, I), recursing through the chain."""
    mu, s2 = MU.flatten().double().numpy(), S.flatten().double().numpy() ** 2
    offset, var = -math.sqrt(d.alphas_cumprod[-1]) * mu, np.ones(2)  # of x - a μ
    for i in reversed(range(d.num_timesteps)):
        beta, ab = d.betas[i], d.alphas_cumprod[i]
        ab_prev = 1.0 if i == 0 else d.alphas_cumprod[i - 1]
        # μ_θ = coef1 x̂_0 + coef2 x_t with x̂_0 - μ = a s² (x_t - a μ) / (a² s² + b²) (DDPM Eq. 7).
        coef1 = beta * math.sqrt(ab_prev) / (1 - ab)
        coef2 = (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        gain = coef1 * math.sqrt(ab) * s2 / (ab * s2 + 1 - ab) + coef2
        offset, var = gain * offset, gain**2 * var + (beta if i > 0 else 0.0)  # Σ = β_t
    return mu + offset, np.sqrt(var)


def _moments(x: torch.Tensor):
    return x.mean(0).flatten().double().numpy(), x.std(0).flatten().double().numpy()


def test_ddpm_matches_gaussian_data_and_its_exact_chain():
    d = _respaced("100")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20_000, 2, 1, 1, generator=g)
    result = ddpm_sample(d, optimal_eps, x_T, clip_denoised=False, generator=g)
    assert result.num_model_evals == 100
    mean, std = _moments(result.sample)
    # The data, up to 100-step discretisation (≈2 %) and sampling error.
    np.testing.assert_allclose(mean, MU.flatten().numpy(), atol=0.03)
    np.testing.assert_allclose(std, S.flatten().numpy(), rtol=0.04)
    # The exact law of this discretised chain, up to sampling error (std error ≈ 0.5 %).
    expected_mean, expected_std = _ddpm_moments(d)
    np.testing.assert_allclose(mean, expected_mean, atol=4 * expected_std.max() / math.sqrt(20_000))
    np.testing.assert_allclose(std, expected_std, rtol=0.02)


def test_ddim_is_the_exact_affine_map_and_matches_the_data():
    d = _respaced("100")
    x_T = torch.randn(20_000, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    result = ddim_sample(d, optimal_eps, x_T, clip_denoised=False)
    assert result.num_model_evals == 100
    _, _, gain = _ddim_moments(d, eta=0.0)
    gain = torch.tensor(gain, dtype=torch.float32).view(1, 2, 1, 1)
    expected = MU + gain * (x_T - math.sqrt(d.alphas_cumprod[-1]) * MU)
    torch.testing.assert_close(result.sample, expected, atol=1e-4, rtol=0)
    mean, std = _moments(result.sample)
    np.testing.assert_allclose(mean, MU.flatten().numpy(), atol=0.03)
    np.testing.assert_allclose(std, S.flatten().numpy(), rtol=0.05)


def test_ddim_eta_one_matches_its_exact_chain_and_the_data():
    d = _respaced("100")
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(20_000, 2, 1, 1, generator=g)
    sample = ddim_sample(d, optimal_eps, x_T, eta=1.0, clip_denoised=False, generator=g).sample
    mean, std = _moments(sample)
    expected_mean, expected_std, _ = _ddim_moments(d, eta=1.0)
    np.testing.assert_allclose(mean, expected_mean, atol=4 * expected_std.max() / math.sqrt(20_000))
    np.testing.assert_allclose(std, expected_std, rtol=0.02)
    # σ = β̃-sized steps lose some spread at 100 steps (≈6 % for s = 0.5).
    np.testing.assert_allclose(mean, MU.flatten().numpy(), atol=0.03)
    np.testing.assert_allclose(std, S.flatten().numpy(), rtol=0.08)


def test_ddim_inversion_round_trips():
    d = _respaced("ddim500")
    x_0 = MU + S * torch.randn(512, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    latent = ddim_invert(d, optimal_eps, x_0, clip_denoised=False)
    assert latent.num_model_evals == 499
    # Inversion is the same affine step read upwards: x_{T-1} - a μ = Π k'(x_0 - a_0 μ).
    s2 = S.flatten().double().numpy() ** 2
    up = np.ones(2)
    for i in range(d.num_timesteps - 1):
        ab, ab_next = d.alphas_cumprod[i], d.alphas_cumprod_next[i]
        a, b, a_n, b_n = map(math.sqrt, (ab, 1 - ab, ab_next, 1 - ab_next))
        up *= (a_n * a * s2 + b_n * b) / (ab * s2 + 1 - ab)
    up = torch.tensor(up, dtype=torch.float32).view(1, 2, 1, 1)
    a_0, a_last = math.sqrt(d.alphas_cumprod[0]), math.sqrt(d.alphas_cumprod[-1])
    torch.testing.assert_close(
        latent.sample, a_last * MU + up * (x_0 - a_0 * MU), atol=1e-4, rtol=0
    )
    # The latent is standard normal, and sampling brings x_0 back up to the ODE steps' error.
    np.testing.assert_allclose(latent.sample.std(0).flatten().numpy(), [1, 1], atol=0.1)
    back = ddim_sample(d, optimal_eps, latent.sample, clip_denoised=False).sample
    torch.testing.assert_close(back, x_0, atol=0.03, rtol=0)
    assert (back - x_0).abs().mean() < 0.01


def test_step_functions_and_counts():
    d = _respaced("10")
    calls = []

    def model_fn(x, t):
        calls.append(t)
        return optimal_eps(x, t)

    x = torch.randn(3, 2, 1, 1)
    # One network call per step, except Heun's second-order correction: 2 per step but the last.
    expected = {"heun": 2 * 10 - 1}
    for name, sampler in SAMPLERS.items():
        calls.clear()
        result = sampler(d, model_fn, x, clip_denoised=False, progress=True)
        assert result.num_model_evals == len(calls) == expected.get(name, 10)
        assert result.sample.shape == x.shape and torch.isfinite(result.sample).all()
    seen = []
    ddim_sample(d, optimal_eps, x, callback=lambda i, step: seen.append(i))
    assert seen == list(range(9, -1, -1))


def test_per_image_generators_do_not_depend_on_the_batch():
    d = _respaced("10")
    seeds = [11, 12, 13, 14]

    def generators(ids):
        return [torch.Generator().manual_seed(seeds[i]) for i in ids]

    x_T = randn((4, 2, 1, 1), generator=generators(range(4)))
    whole = ddpm_sample(d, optimal_eps, x_T, generator=generators(range(4))).sample
    part = ddpm_sample(d, optimal_eps, x_T[2:], generator=generators([2, 3])).sample
    torch.testing.assert_close(part, whole[2:])
    alone = randn((1, 2, 1, 1), generator=generators([3]))
    torch.testing.assert_close(alone, x_T[3:])


# -- classifier guidance -----------------------------------------------------------------------


def test_zero_classifier_gradient_changes_nothing():
    d = _respaced("20")
    x_T = torch.randn(8, 2, 1, 1, generator=torch.Generator().manual_seed(4))

    def zero(x, t, **kwargs):
        return torch.zeros_like(x)

    for sampler, options in ((ddpm_sample, {}), (ddim_sample, {"eta": 0.5})):
        runs = [
            sampler(
                d,
                optimal_eps,
                x_T,
                cond_fn=cond_fn,
                generator=torch.Generator().manual_seed(5),
                **options,
            ).sample
            for cond_fn in (None, zero)
        ]
        torch.testing.assert_close(runs[0], runs[1], atol=1e-6, rtol=0)


def test_alg1_shifts_the_mean_by_sigma_times_gradient_and_draws_noise_first():
    d = _respaced("20")
    x = torch.randn(4, 2, 1, 1)
    t = torch.tensor([19, 10, 3, 0])
    g = torch.tensor([0.7, -1.3]).view(1, 2, 1, 1)

    def constant(x, t_model, **kwargs):
        torch.randn(5)  # consumes the global generator: only the noise drawn first survives
        return g.expand_as(x)

    torch.manual_seed(6)
    plain = ddpm_step(d, optimal_eps, x, t)
    torch.manual_seed(6)
    guided = ddpm_step(d, optimal_eps, x, t, cond_fn=constant)
    variance = torch.tensor(d.fixed_large_variance[t.numpy()], dtype=torch.float32)
    torch.testing.assert_close(guided.sample - plain.sample, variance.view(-1, 1, 1, 1) * g)
    torch.testing.assert_close(guided.x_0, plain.x_0)


def test_alg2_shifts_eps_and_draws_noise_after():
    d = _respaced("20")
    x = torch.randn(4, 2, 1, 1)
    t = torch.tensor([19, 10, 3, 0])
    g = torch.tensor([0.7, -1.3]).view(1, 2, 1, 1)
    alpha_bar = torch.from_numpy(BASE.alphas_cumprod).float()

    def constant(x, t_model, **kwargs):
        return g.expand_as(x)

    def shifted_eps(x, t_model):
        return optimal_eps(x, t_model) - (1 - alpha_bar[t_model]).sqrt().view(-1, 1, 1, 1) * g

    for eta in (0.0, 0.8):
        torch.manual_seed(7)
        guided = ddim_step(d, optimal_eps, x, t, eta=eta, cond_fn=constant, clip_denoised=False)
        torch.manual_seed(7)
        plain = ddim_step(d, shifted_eps, x, t, eta=eta, clip_denoised=False)
        torch.testing.assert_close(guided.sample, plain.sample, atol=1e-5, rtol=1e-5)

    def consuming(x, t_model, **kwargs):
        torch.randn(x.shape)
        return torch.zeros_like(x)

    torch.manual_seed(8)
    guided = ddim_step(d, optimal_eps, x, t, eta=1.0, cond_fn=consuming)
    torch.manual_seed(8)
    torch.randn(x.shape)  # DDIM's noise comes after the classifier's draw
    plain = ddim_step(d, optimal_eps, x, t, eta=1.0)
    torch.testing.assert_close(guided.sample, plain.sample, atol=1e-6, rtol=0)


class LinearClassifier(torch.nn.Module):
    """logits = W x; records the timesteps it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return x.flatten(1) @ self.weight.T


def test_classifier_grad_fn_is_the_softmax_gradient_at_original_timesteps():
    classifier = LinearClassifier()
    cond_fn = classifier_grad_fn(classifier, scale=2.5)
    x = torch.randn(3, 2, 1, 1)
    y = torch.tensor([0, 1, 1])
    with torch.no_grad():  # samplers call it without a graph
        grad = cond_fn(x, torch.tensor([5, 6, 7]), y=y, low_res=None)
    w = classifier.weight.detach()
    p = torch.softmax(x.flatten(1) @ w.T, dim=-1)
    expected = 2.5 * (w[y] - p @ w)  # ∇_x log softmax(Wx)[y] = w_y - Σ_k p_k w_k
    torch.testing.assert_close(grad.flatten(1), expected)
    with pytest.raises(ValueError, match="needs class labels"):
        cond_fn(x, torch.tensor([5, 6, 7]))


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_linear_classifier_moves_samples_toward_its_class(sampler):
    d = _respaced("ddim20")
    classifier = LinearClassifier()
    g = torch.Generator().manual_seed(9)
    x_T = torch.randn(2000, 2, 1, 1, generator=g)
    kwargs = {"y": torch.ones(2000, dtype=torch.long)}  # class 1 likes x_1 - x_0 large
    runs = {}
    for scale in (0.0, 3.0):
        classifier.seen.clear()
        runs[scale] = sampler(
            d,
            optimal_eps,
            x_T,
            model_kwargs=kwargs,
            cond_fn=classifier_grad_fn(classifier, scale),
            generator=torch.Generator().manual_seed(10),
        ).sample
    # The classifier saw the original indices of the respaced chain, from T-1 down.
    assert [int(t[0]) for t in classifier.seen] == list(range(950, -1, -50))
    margin = {scale: (x[:, 1] - x[:, 0]).mean().item() for scale, x in runs.items()}
    assert margin[3.0] > margin[0.0] + 1.0
    accuracy = {
        scale: ((x.flatten(1) @ classifier.weight.T).argmax(-1) == 1).float().mean().item()
        for scale, x in runs.items()
    }
    assert accuracy[3.0] > accuracy[0.0] + 0.5
