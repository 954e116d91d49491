"""The diffusion math: golden values of the original (reference §4, §5, §13), closed forms and
identities computed here independently of admkit's code."""

import math

import numpy as np
import pytest
import torch

from admkit.diffusion import (
    Diffusion,
    DiffusionConfig,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacingError,
    beta_schedule,
    respace,
    space_timesteps,
)
from admkit.errors import UserError
from admkit.losses import (
    calc_bpd_loop,
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    training_losses,
    vb_terms_bpd,
)
from admkit.timestep_sampling import (
    LossSecondMomentResampler,
    UniformSampler,
    schedule_sampler,
)


def _diffusion(steps=1000, schedule="linear", respacing="", **flags) -> Diffusion:
    config = DiffusionConfig(
        diffusion_steps=steps, noise_schedule=schedule, timestep_respacing=respacing, **flags
    )
    return Diffusion.from_config(config)


# -- schedules: golden values of the original (§4.1, §4.2, §13) ------------------------------


def test_linear_schedule_golden():
    d = _diffusion()
    assert d.betas.dtype == np.float64
    expected = {
        "betas": {0: 1e-4, 1: 1.1991991991991993e-4, 999: 0.02},
        "alphas_cumprod": {0: 0.9999, 499: 0.07858724288177824, 999: 4.035829765375676e-05},
        "posterior_variance": {1: 5.453187661300667e-05},
        "posterior_mean_coef1": {1: 0.5452914995101377},
        "posterior_mean_coef2": {1: 0.4547084989905303},
    }
    for name, values in expected.items():
        for i, value in values.items():
            assert getattr(d, name)[i] == pytest.approx(value, rel=1e-12), (name, i)
    assert d.posterior_variance[0] == 0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    assert d.posterior_log_variance_clipped[0] == pytest.approx(-9.8167251353, rel=1e-10)
    assert d.alphas_cumprod_prev[0] == 1.0 and d.alphas_cumprod_next[-1] == 0.0
    long = beta_schedule("linear", 4000)
    assert (long[0], long[-1]) == (pytest.approx(2.5e-5), pytest.approx(0.005))


def test_cosine_schedule_golden():
    d = _diffusion(schedule="cosine")
    golden = {0: 4.128422482196914e-05, 1: 4.614175273665033e-05, 500: 0.003155691441585007}
    golden |= {998: 0.7499993929011166, 999: 0.999}
    for i, value in golden.items():
        assert d.betas[i] == pytest.approx(value, rel=1e-12), i
    assert (d.betas < 0.999).sum() == 999  # only the last is clipped
    for i, value in {0: 0.999958715775178, 499: 0.4938435904406382}.items():
        assert d.alphas_cumprod[i] == pytest.approx(value, rel=1e-12)
    assert d.alphas_cumprod[999] == pytest.approx(2.4287669070348567e-09, rel=1e-9)


def test_schedule_mistakes_are_user_errors():
    with pytest.raises(UserError, match="unknown beta schedule"):
        beta_schedule("sigmoid", 1000)
    with pytest.raises(UserError, match="more than 20"):
        beta_schedule("linear", 20)


# -- respacing (§5) --------------------------------------------------------------------------


def test_space_timesteps_golden():
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[:5] == [0, 4, 8, 12, 16]
    for run in ([160, 164, 169, 173], [497, 502], [830, 835], [995, 999]):
        i = s250.index(run[0])
        assert s250[i : i + len(run)] == run
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    for count, stride in ((50, 20), (100, 10), (250, 4)):
        assert space_timesteps(1000, f"ddim{count}") == set(range(0, 1000, stride))
    s100 = sorted(space_timesteps(1000, "100"))
    assert s100[:8] == [0, 10, 20, 30, 40, 50, 61, 71] and s100[-2:] == [989, 999]
    s50 = sorted(space_timesteps(1000, "50"))
    assert s50[:8] == [0, 20, 41, 61, 82, 102, 122, 143] and s50[-2:] == [979, 999]
    s25 = sorted(space_timesteps(1000, "25"))
    assert s25[:8] == [0, 42, 83, 125, 166, 208, 250, 291] and s25[-2:] == [957, 999]
    assert sorted(space_timesteps(1000, "10,10,10")) == [
        *(0, 37, 74, 111, 148, 185, 222, 259, 296, 333),
        *(334, 371, 408, 445, 482, 518, 555, 592, 629, 666),
        *(667, 704, 741, 778, 815, 851, 888, 925, 962, 999),
    ]
    assert sorted(space_timesteps(1000, "1,2,3")) == [0, 334, 666, 667, 833, 999]
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [10, 10]) == space_timesteps(1000, "10,10")


def test_space_timesteps_errors_keep_the_original_text():
    # The original names T, not the asked count, in this message (quirk §12.14).
    with pytest.raises(SpacingError, match="cannot create exactly 1000 steps with an integer"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot divide section of 500 steps into 501"):
        space_timesteps(1000, "501,1")
    with pytest.raises(UserError, match="not understood"):
        space_timesteps(1000, "fast")
    with pytest.raises(UserError, match="keeps no steps"):
        space_timesteps(1000, "0")
    with pytest.raises(UserError, match="at least 2 steps"):
        _diffusion(respacing="1")


def test_respaced_golden():
    d250 = _diffusion(respacing="250")
    base = _diffusion()
    assert d250.num_timesteps == 250 and d250.timestep_map[:5].tolist() == [0, 4, 8, 12, 16]
    assert d250.alphas_cumprod[-1] == pytest.approx(base.alphas_cumprod[999], rel=1e-10)
    golden = [1e-4, 5.9906556448e-4, 9.1760299282e-4]
    np.testing.assert_allclose(d250.betas[:3], golden, rtol=1e-9)
    assert d250.betas[-1] == pytest.approx(0.07751934499235003, rel=1e-10)
    d25 = _diffusion(respacing="ddim25")
    assert d25.alphas_cumprod_prev[0] == 1.0
    assert d25.betas[0] == pytest.approx(1e-4, rel=1e-10)
    assert d25.betas[1] == pytest.approx(0.02013508946067577, rel=1e-10)
    assert d25.betas[-1] == pytest.approx(0.5326018230995546, rel=1e-10)
    assert d25.alphas_cumprod[-1] == pytest.approx(8.741305391053614e-05, rel=1e-10)
    assert d25.original_num_steps == 1000


@pytest.mark.parametrize("spacing", ["ddim10", "37", "3,5,7", "250"])
def test_respacing_keeps_alpha_bar_at_kept_steps(spacing):
    base = _diffusion(schedule="cosine")
    spaced = respace(base, space_timesteps(1000, spacing))
    np.testing.assert_allclose(
        spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map], rtol=1e-8
    )
    # Respacing a respaced chain composes the maps to original indices.
    twice = respace(spaced, {0, spaced.num_timesteps - 1})
    assert twice.timestep_map.tolist() == [0, int(spaced.timestep_map[-1])]


def test_model_timesteps_are_original_indices_or_rescaled():
    d = _diffusion(steps=100, respacing="ddim5")
    t = torch.tensor([0, 1, 4])
    assert d.model_timesteps(t).tolist() == [0, 20, 80]
    assert d.model_timesteps(t).dtype == torch.int64
    r = _diffusion(steps=4000, respacing="ddim4", rescale_timesteps=True)
    assert r.model_timesteps(torch.tensor([1, 3])).tolist() == [250.0, 750.0]


# -- forward process and posterior ----------------------------------------------------------


def test_q_sample_moments():
    d = _diffusion(schedule="cosine")
    g = torch.Generator().manual_seed(0)
    x_0 = torch.tensor([0.8, -0.5, 0.1]).view(1, 3).expand(100_000, 3)
    for i in (10, 500, 950):
        t = torch.full((100_000,), i)
        x_t = d.q_sample(x_0, t, torch.randn(x_0.shape, generator=g))
        a = d.alphas_cumprod[i]
        torch.testing.assert_close(x_t.mean(0), math.sqrt(a) * x_0[0], atol=0.015, rtol=0)
        torch.testing.assert_close(
            x_t.var(0), torch.full((3,), 1 - a, dtype=torch.float32), atol=0.015, rtol=0.02
        )
        mean, variance, log_variance = d.q_mean_variance(x_0[:1], t[:1])
        torch.testing.assert_close(mean, math.sqrt(a) * x_0[:1])
        assert variance[0, 0].item() == pytest.approx(1 - a, rel=1e-6)
        assert log_variance[0, 0].item() == pytest.approx(math.log(1 - a), rel=1e-6)


def _bayes_posterior(betas: np.ndarray, i: int, x_0: np.ndarray, x_t: np.ndarray):
    """q(x_{t-1} | x_t, x_0) by Bayes' rule from q(x_{t-1} | x_0) and q(x_t | x_{t-1})."""
    alpha_bar_prev = np.prod(1 - betas[:i])
    alpha = 1 - betas[i]
    precision = 1 / (1 - alpha_bar_prev) + alpha / betas[i]
    variance = 1 / precision
    mean = variance * (
        math.sqrt(alpha_bar_prev) * x_0 / (1 - alpha_bar_prev) + math.sqrt(alpha) * x_t / betas[i]
    )
    return mean, variance


@pytest.mark.parametrize("spacing", ["", "ddim10"])
def test_posterior_by_bayes_rule(spacing):
    d = _diffusion(steps=200, respacing=spacing)
    rng = np.random.default_rng(1)
    x_0, x_t = rng.normal(size=(2, 1, 5))
    for i in range(1, d.num_timesteps):
        mean, variance, log_variance = d.q_posterior_mean_variance(
            torch.tensor(x_0, dtype=torch.float32),
            torch.tensor(x_t, dtype=torch.float32),
            torch.tensor([i]),
        )
        # Spaced chain: its own β between kept steps, from the base ᾱ (respacing by hand).
        base = _diffusion(steps=200).alphas_cumprod
        kept = base[d.timestep_map]
        betas = 1 - kept / np.append(1.0, kept[:-1])
        expected_mean, expected_variance = _bayes_posterior(betas, i, x_0, x_t)
        np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=2e-5, atol=2e-6)
        assert variance[0, 0].item() == pytest.approx(expected_variance, rel=1e-5)
        assert log_variance[0, 0].item() == pytest.approx(math.log(expected_variance), rel=1e-5)


def test_posterior_matches_monte_carlo_regression():
    # Draw x_{t-1} ~ q(x_{t-1} | x_0), x_t ~ q(x_t | x_{t-1}); regressing x_{t-1} on x_t must
    # give slope coef2, intercept coef1·x_0 and residual variance β̃_t.
    d = _diffusion(steps=1000)
    g = torch.Generator().manual_seed(2)
    i, x_0, n = 300, 0.6, 400_000
    a_prev, beta = d.alphas_cumprod[i - 1], d.betas[i]
    x_prev = math.sqrt(a_prev) * x_0 + math.sqrt(1 - a_prev) * torch.randn(n, generator=g).double()
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(n, generator=g).double()
    slope = torch.cov(torch.stack([x_prev, x_t]))[0, 1] / x_t.var()
    intercept = x_prev.mean() - slope * x_t.mean()
    residual = (x_prev - intercept - slope * x_t).var()
    assert slope.item() == pytest.approx(d.posterior_mean_coef2[i], abs=2e-3)
    assert intercept.item() == pytest.approx(d.posterior_mean_coef1[i] * x_0, abs=2e-3)
    assert residual.item() == pytest.approx(d.posterior_variance[i], rel=1e-2)


# -- parameterisations and variances (§4.5) --------------------------------------------------


def _data(seed=3, shape=(4, 3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 1.6 - 0.8), torch.randn(shape, generator=g)


def test_three_mean_parameterisations_recover_x0():
    x_0, eps = _data()
    t = torch.tensor([0, 5, 50, 90])
    for mean_type in ModelMeanType:
        d = Diffusion(beta_schedule("linear", 100), mean_type=mean_type)
        x_t = d.q_sample(x_0, t, eps)
        true_mean, _, _ = d.q_posterior_mean_variance(x_0, x_t, t)
        output = {ModelMeanType.EPSILON: eps, ModelMeanType.START_X: x_0}.get(mean_type, true_mean)
        pred = d.p_mean_variance(output, x_t, t, clip_denoised=False)
        torch.testing.assert_close(pred.x_0, x_0, atol=2e-3, rtol=0)
        torch.testing.assert_close(pred.mean, true_mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(pred.eps[1:], eps[1:], atol=2e-3, rtol=0)


def test_denoised_fn_then_clip():
    d = Diffusion(beta_schedule("linear", 100), mean_type=ModelMeanType.START_X)
    x_t = torch.zeros(1, 1, 2, 2)
    output = torch.tensor([0.3, -0.2, 0.05, 0.9]).view(1, 1, 2, 2)
    pred = d.p_mean_variance(output, x_t, torch.tensor([10]), denoised_fn=lambda x: 4 * x)
    assert pred.x_0.flatten().tolist() == pytest.approx([1.0, -0.8, 0.2, 1.0])


def test_variance_types():
    t = torch.tensor([0, 1, 40])
    x_t = torch.zeros(3, 2, 1, 1)
    betas = beta_schedule("linear", 1000)
    large = Diffusion(betas, var_type=ModelVarType.FIXED_LARGE)
    pred = large.p_mean_variance(torch.zeros_like(x_t), x_t, t)
    # Σ = β_t, but β̃_1 at t = 0 (golden 5.4531876613e-05; quirk §12.10).
    expected = [5.453187661300667e-05, betas[1], betas[40]]
    assert pred.variance[:, 0, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)
    small = Diffusion(betas, var_type=ModelVarType.FIXED_SMALL)
    pred = small.p_mean_variance(torch.zeros_like(x_t), x_t, t)
    assert pred.variance[:, 0, 0, 0].tolist() == pytest.approx(
        small.posterior_variance[[0, 1, 40]].tolist(), rel=1e-6
    )
    learned = Diffusion(betas, var_type=ModelVarType.LEARNED_RANGE)
    log_beta, log_tilde = np.log(betas[40]), learned.posterior_log_variance_clipped[40]
    # v = 1 gives log β, v = -1 log β̃, and v is not clamped: v = 3 extrapolates.
    for v, expected in ((1.0, log_beta), (-1.0, log_tilde), (3.0, 2 * log_beta - log_tilde)):
        output = torch.cat([torch.zeros(1, 2, 1, 1), torch.full((1, 2, 1, 1), v)], dim=1)
        pred = learned.p_mean_variance(output, x_t[:1], t[2:])
        assert pred.log_variance[0, 0, 0, 0].item() == pytest.approx(expected, rel=1e-6)
        assert pred.variance[0, 0, 0, 0].item() == pytest.approx(math.exp(expected), rel=1e-5)
    raw = Diffusion(betas, var_type=ModelVarType.LEARNED)
    pred = raw.p_mean_variance(torch.full((1, 4, 1, 1), -3.0), x_t[:1], t[2:])
    assert pred.log_variance.flatten().tolist() == [-3.0, -3.0]
    with pytest.raises(ValueError, match="must output 4 channels"):
        learned.p_mean_variance(torch.zeros(1, 2, 1, 1), x_t[:1], t[2:])


def test_predict_runs_the_model_at_original_timesteps():
    d = _diffusion(steps=100, respacing="ddim5")
    seen = []

    def model_fn(x, t, y=None):
        seen.append((t.tolist(), y))
        return torch.zeros_like(x)

    d.predict(model_fn, torch.zeros(2, 1, 2, 2), torch.tensor([4, 2]), model_kwargs={"y": 7})
    assert seen == [([80, 40], 7)]


# -- KL, likelihood and losses (§4.6, §4.7) --------------------------------------------------


def test_normal_kl_golden_and_closed_form():
    zero = torch.tensor(0.0)
    assert normal_kl(zero, 0.0, 1.0, 0.0).item() == pytest.approx(0.5)
    assert normal_kl(zero, math.log(4), 0.0, 0.0).item() == pytest.approx(0.8068528194400546)
    g = torch.Generator().manual_seed(4)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=g).double()
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()),
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_likelihood_golden_and_normalised():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5])
    log_p = discretized_gaussian_log_likelihood(
        x, means=torch.zeros(4), log_scales=torch.full((4,), math.log(0.1))
    )
    golden = [-27.631021, -3.4647264, -27.631021, -16.635532]
    assert log_p.tolist() == pytest.approx(golden, rel=1e-5)
    # The 256 bins cover the real line: probabilities sum to one, and each is the exact
    # Gaussian mass of its bin up to the tanh approximation of Φ.
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, scale in ((0.1, 0.3), (-0.7, 0.05), (0.95, 1.0)):
        log_p = discretized_gaussian_log_likelihood(
            values,
            means=torch.full_like(values, mean),
            log_scales=torch.full_like(values, math.log(scale)),
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
        normal = torch.distributions.Normal(mean, scale)
        upper = torch.where(
            values > 0.999, torch.tensor(1.0).double(), normal.cdf(values + 1 / 255)
        )
        lower = torch.where(
            values < -0.999, torch.tensor(0.0).double(), normal.cdf(values - 1 / 255)
        )
        torch.testing.assert_close(log_p.exp(), upper - lower, atol=2e-3, rtol=0)


def test_prior_bpd_closed_form():
    d = _diffusion(steps=100)
    x_0, _ = _data()
    a = d.alphas_cumprod[-1]
    per_dim = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x_0.double() ** 2) / math.log(2)
    expected = per_dim.mean(dim=(1, 2, 3)).float()
    torch.testing.assert_close(prior_bpd(d, x_0), expected, rtol=1e-5, atol=1e-9)


def _constant_model(output: torch.Tensor):
    return lambda x, t, **kwargs: output.expand(x.shape[0], output.shape[1], *x.shape[2:])


def test_vb_term_is_kl_for_t_positive_and_decoder_nll_at_zero():
    d = _diffusion(steps=100, learn_sigma=True)
    x_0, eps = _data()
    t = torch.tensor([0, 0, 7, 60])
    x_t = d.q_sample(x_0, t, eps)
    wrong_eps = eps + 0.3 * torch.randn(eps.shape, generator=torch.Generator().manual_seed(6))
    output = torch.cat([wrong_eps, torch.full_like(eps, 0.5)], dim=1)
    bpd, pred = vb_terms_bpd(d, output, x_0, x_t, t, clip_denoised=False)
    true_mean, _, true_log_var = d.q_posterior_mean_variance(x_0, x_t, t)
    # Gaussian KL per dimension, written out here, in bits.
    kl = 0.5 * (
        pred.log_variance
        - true_log_var
        + (true_log_var.exp() + (true_mean - pred.mean) ** 2) / pred.log_variance.exp()
        - 1
    )
    torch.testing.assert_close(bpd[2:], kl[2:].mean(dim=(1, 2, 3)) / math.log(2), rtol=1e-5, atol=0)
    # t = 0: -log of the Gaussian mass of each pixel's 8-bit bin (edge bins open-ended).
    std = (0.5 * pred.log_variance[:2]).exp().double()
    normal = torch.distributions.Normal(pred.mean[:2].double(), std)
    x = x_0[:2].double()
    mass = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
    expected = -mass.clamp(min=1e-12).log().mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(bpd[:2].double(), expected, rtol=2e-2, atol=0)


def test_loss_types_select_as_the_original():
    assert DiffusionConfig().loss_type == LossType.MSE
    assert DiffusionConfig(rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    assert DiffusionConfig(use_kl=True).loss_type == LossType.RESCALED_KL
    assert (
        DiffusionConfig(use_kl=True, rescale_learned_sigmas=True).loss_type == LossType.RESCALED_KL
    )
    assert DiffusionConfig(learn_sigma=True).var_type == ModelVarType.LEARNED_RANGE
    assert DiffusionConfig(sigma_small=True).var_type == ModelVarType.FIXED_SMALL
    assert DiffusionConfig().var_type == ModelVarType.FIXED_LARGE
    assert DiffusionConfig(predict_xstart=True).mean_type == ModelMeanType.START_X
    assert DiffusionConfig().mean_type == ModelMeanType.EPSILON


def test_training_loss_terms_and_rescaling():
    x_0, eps = _data()
    t = torch.tensor([0, 3, 200, 499])
    betas = beta_schedule("linear", 500)
    out6 = torch.randn(1, 6, 4, 4, generator=torch.Generator().manual_seed(5)) * 0.3
    model6, model3 = _constant_model(out6), _constant_model(out6[:, :3])

    def losses(var_type, loss_type, model):
        d = Diffusion(betas, var_type=var_type, loss_type=loss_type)
        return training_losses(d, model, x_0, t, noise=eps)

    simple = losses(ModelVarType.FIXED_LARGE, LossType.MSE, model3)
    assert set(simple) == {"mse", "loss"}
    expected_mse = ((eps - out6[:, :3]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(simple["mse"], expected_mse)
    hybrid = losses(ModelVarType.LEARNED_RANGE, LossType.MSE, model6)
    assert set(hybrid) == {"mse", "vb", "loss"}
    torch.testing.assert_close(hybrid["mse"], expected_mse)
    torch.testing.assert_close(hybrid["loss"], hybrid["mse"] + hybrid["vb"])
    rescaled = losses(ModelVarType.LEARNED_RANGE, LossType.RESCALED_MSE, model6)
    torch.testing.assert_close(rescaled["vb"], hybrid["vb"] * 500 / 1000)  # T/1000
    kl = losses(ModelVarType.LEARNED_RANGE, LossType.KL, model6)
    assert set(kl) == {"loss"}
    torch.testing.assert_close(kl["loss"], hybrid["vb"])
    rescaled_kl = losses(ModelVarType.LEARNED_RANGE, LossType.RESCALED_KL, model6)
    torch.testing.assert_close(rescaled_kl["loss"], kl["loss"] * 500)
    start_x = Diffusion(betas, mean_type=ModelMeanType.START_X)
    mse = training_losses(start_x, model3, x_0, t, noise=eps)["mse"]
    torch.testing.assert_close(mse, ((x_0 - out6[:, :3]) ** 2).mean(dim=(1, 2, 3)))


def test_hybrid_vb_term_does_not_train_the_mean():
    d = Diffusion(beta_schedule("linear", 100), var_type=ModelVarType.LEARNED_RANGE)
    x_0, eps = _data()
    out = torch.zeros(1, 6, 1, 1, requires_grad=True)
    model = _constant_model(out)
    t = torch.tensor([0, 10, 50, 99])
    training_losses(d, model, x_0, t, noise=eps)["vb"].sum().backward()
    assert torch.all(out.grad[:, :3] == 0) and torch.all(out.grad[:, 3:] != 0)
    out.grad = None
    training_losses(d, model, x_0, t, noise=eps)["mse"].sum().backward()
    assert torch.all(out.grad[:, :3] != 0) and torch.all(out.grad[:, 3:] == 0)


def test_calc_bpd_loop_order_and_total():
    d = _diffusion(steps=100, respacing="4", learn_sigma=True)
    seen = []

    def model_fn(x, t):
        seen.append(int(t[0]))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    x_0, _ = _data()
    out = calc_bpd_loop(d, model_fn, x_0)
    assert seen == [99, 66, 33, 0]  # column 0 is t = T-1 (quirk §12.19)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (4, 4)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    torch.testing.assert_close(out["prior_bpd"], prior_bpd(d, x_0))
    # A zero-ε model predicts x̂_0 = x_t/√ᾱ clipped: its error is zero only if nothing else is.
    assert (out["xstart_mse"] > 0).all() and (out["vb"] > 0).all()


# -- timestep samplers -------------------------------------------------------------------------


def test_uniform_sampler():
    sampler = schedule_sampler("uniform", 10)
    assert isinstance(sampler, UniformSampler)
    t, weights = sampler.sample(1000, "cpu", rng=np.random.default_rng(0))
    assert set(t.tolist()) == set(range(10)) and torch.equal(weights, torch.ones(1000))


def test_loss_second_moment_weights_closed_form():
    sampler = LossSecondMomentResampler(4)
    assert isinstance(schedule_sampler("loss-second-moment", 4), LossSecondMomentResampler)
    for _ in range(9):
        sampler.update_with_local_losses(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert sampler.weights().tolist() == [1.0] * 4  # not every t has 10 losses yet
    sampler.update_with_all_losses([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    expected = 0.999 * np.array([1, 2, 3, 4]) / 10 + 0.001 / 4
    np.testing.assert_allclose(sampler.weights(), expected)
    # Only the latest 10 losses count: push 10 more for t = 0.
    sampler.update_with_all_losses([0] * 10, [4.0] * 10)
    expected = 0.999 * np.array([4, 2, 3, 4]) / 13 + 0.001 / 4
    np.testing.assert_allclose(sampler.weights(), expected)
    t, weights = sampler.sample(2000, "cpu", rng=np.random.default_rng(1))
    np.testing.assert_allclose(weights.numpy(), 1 / (4 * expected[t.numpy()]), rtol=1e-6)
    assert abs((t == 1).float().mean().item() - expected[1]) < 0.03
    with pytest.raises(UserError, match="unknown schedule sampler"):
        schedule_sampler("importance", 4)
