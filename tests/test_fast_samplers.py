"""The fast solvers (DPM-Solver++ 2M, its SDE variant, Heun) and step selection, vs closed forms.

For x_0 ~ N(μ, s²) per dimension the optimal noise predictor is E[ε | x_t] = b (x_t - a μ) /
(a² s² + b²) with a = √ᾱ, b = √(1 - ᾱ), and the probability-flow ODE carries x_T to
x_0 = μ + s (x_T - a_T μ) / √(a_T² s² + b_T²) exactly (each dimension stays Gaussian, and the
flow of a Gaussian is the affine map between its marginals). With that predictor every
deterministic solver is an affine map per dimension, so two runs (x_T = 0 and x_T = 1) give its
exact output law for x_T ~ N(0, I): no sampling error in the comparisons below.
"""

import math

import numpy as np
import pytest
import torch

from admkit.diffusion import Diffusion, DiffusionConfig, ModelMeanType, ModelVarType, respace
from admkit.errors import UserError
from admkit.noise import randn
from admkit.samplers import (
    SAMPLERS,
    dpm_solver_2m_sample,
    get_sampler,
    heun_sample,
    levels_for_steps,
)
from admkit.step_selection import (
    default_step_spacing,
    karras_timesteps,
    logsnr_timesteps,
    select_timesteps,
)

MU = torch.tensor([0.3, -0.4]).view(1, 2, 1, 1)
S = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1)
BASE = Diffusion.from_config(DiffusionConfig())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds contention on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def optimal_eps(x, t_model, **_):
    """E[ε | x_t] for the Gaussian data; t_model is an original step of the 1000-step chain."""
    a2 = torch.from_numpy(BASE.alphas_cumprod)[t_model].double().view(-1, 1, 1, 1)
    a, b = a2.sqrt(), (1 - a2).sqrt()
    return (b / (a2 * S.double() ** 2 + b**2) * (x.double() - a * MU.double())).float()


def chain(sampler: str, evals: int, spacing: str = "uniform") -> Diffusion:
    return respace(BASE, select_timesteps(BASE, levels_for_steps(sampler, evals), spacing))


def output_law(sampler: str, d: Diffusion, model_fn=optimal_eps, **options):
    """(offset, gain, evaluations): the solver maps x_T to offset + gain·x_T per dimension."""
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1)
    result = get_sampler(sampler)(d, model_fn, x, clip_denoised=False, **options)
    out = result.sample.view(2, 2).double().numpy()
    return out[0], out[1] - out[0], result.num_model_evals


def exact_flow(d: Diffusion) -> tuple[np.ndarray, np.ndarray]:
    """Offset and gain of the exact ODE map from x_T at ᾱ_{T-1} to x_0."""
    mu, s = MU.flatten().double().numpy(), S.flatten().double().numpy()
    a2 = d.alphas_cumprod[-1]
    gain = s / np.sqrt(a2 * s**2 + 1 - a2)
    return mu - gain * math.sqrt(a2) * mu, gain


def std_error(gain: np.ndarray) -> float:
    """Largest relative error of the output standard deviation against the data's."""
    return float(np.abs(np.abs(gain) / S.flatten().numpy() - 1).max())


# -- registry and step budget ------------------------------------------------------------------


def test_registry_names_every_sampler_and_refuses_unknown_ones():
    assert {"ddpm", "ddim", "dpm++2m", "dpm++2m-sde", "heun"} <= set(SAMPLERS)
    with pytest.raises(
        UserError, match="unknown sampler 'euler'.*ddpm, ddim, dpm\\+\\+2m, dpm\\+\\+2m-sde, heun"
    ):
        get_sampler("euler")


def test_steps_budget_maps_to_levels():
    assert levels_for_steps("ddpm", 20) == levels_for_steps("dpm++2m", 20) == 20
    assert levels_for_steps("heun", 19) == levels_for_steps("heun", 20) == 10
    with pytest.raises(UserError, match="at least 3"):
        levels_for_steps("heun", 2)
    with pytest.raises(UserError, match="unknown sampler"):
        levels_for_steps("lms", 10)


@pytest.mark.parametrize("spacing", ["uniform", "karras", "logsnr"])
def test_every_sampler_counts_its_network_evaluations(spacing):
    for name in SAMPLERS:
        d = chain(name, 9, spacing)
        calls, steps = [], []

        def model_fn(x, t, calls=calls):
            calls.append(int(t[0]))
            return optimal_eps(x, t)

        result = get_sampler(name)(
            d, model_fn, torch.randn(3, 2, 1, 1), callback=lambda i, step, s=steps: s.append(i)
        )
        assert result.num_model_evals == len(calls) == 9, name
        assert steps == list(range(d.num_timesteps - 1, -1, -1)), name
        # Every evaluation is at a trained step of the chain, from the noisiest down.
        assert set(calls) <= set(d.timestep_map.tolist()) and calls[0] == 999, name


# -- step selection ----------------------------------------------------------------------------


def _edm_sigma(indices) -> np.ndarray:
    a = BASE.alphas_cumprod[np.asarray(indices)]
    return np.sqrt((1 - a) / a)


@pytest.mark.parametrize("num_steps", [2, 10, 50, 400])
def test_karras_and_logsnr_steps_are_distinct_trained_levels_with_both_ends(num_steps):
    for pick in (karras_timesteps, logsnr_timesteps):
        steps = pick(BASE, num_steps)
        assert len(steps) == num_steps and len(set(steps)) == num_steps
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 999


def test_karras_steps_follow_eq5_and_logsnr_steps_are_even_in_log_sigma():
    n, rho = 12, 7.0
    hi, lo = _edm_sigma([999])[0], _edm_sigma([0])[0]
    i = np.arange(n)
    karras = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    chosen = _edm_sigma(karras_timesteps(BASE, n))[::-1]
    # Above σ = 0.1 the chain's levels are dense, so each pick lies within 1 % of its target.
    dense = karras > 0.1
    np.testing.assert_allclose(chosen[dense], karras[dense], rtol=0.01)
    log_sigma = np.log(_edm_sigma(logsnr_timesteps(BASE, n))[::-1])
    dense = np.exp(log_sigma) > 0.1
    np.testing.assert_allclose(
        log_sigma[dense], np.linspace(np.log(hi), np.log(lo), n)[dense], atol=0.01
    )
    with pytest.raises(UserError, match="cannot pick 1001 steps"):
        karras_timesteps(BASE, 1001)
    with pytest.raises(UserError, match="unknown step spacing"):
        select_timesteps(BASE, 10, "cosine")


# -- accuracy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpm++2m", "heun"])
def test_fast_solvers_converge_to_the_exact_flow_at_second_order(name):
    errors = []
    for evals in (50, 100, 200):
        d = chain(name, evals)
        offset, gain, _ = output_law(name, d)
        exact_offset, exact_gain = exact_flow(d)
        np.testing.assert_allclose(offset, exact_offset, atol=2e-3)
        errors.append(np.abs(gain - exact_gain).max())
    assert errors[-1] < 2e-3
    # Halving the step size divides the error by about 4 (2 for DDIM, a first-order method).
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3, errors


def test_dpm_solvers_default_to_logsnr_steps_which_beat_even_steps():
    assert default_step_spacing("dpm++2m") == default_step_spacing("dpm++2m-sde") == "logsnr"
    assert default_step_spacing("heun") == "karras" and default_step_spacing("ddpm") == "uniform"
    # Even steps on a cosine chain change h = λ_t - λ_s wildly from step to step, and the
    # multistep extrapolation suffers: 20 evaluations miss the data's spread by over 10 %.
    even = std_error(output_law("dpm++2m", chain("dpm++2m", 20, "uniform"))[1])
    logsnr = std_error(output_law("dpm++2m", chain("dpm++2m", 20, "logsnr"))[1])
    assert logsnr < 0.02 and even > 0.1


def test_ddim_is_first_order_for_comparison():
    errors = [
        np.abs(output_law("ddim", chain("ddim", n))[1] - S.flatten().numpy()).max()
        for n in (50, 100)
    ]
    assert 1.6 < errors[0] / errors[1] < 2.5


def test_fast_solvers_at_twenty_evaluations_beat_the_first_order_samplers():
    # DPM-Solver++ 2M on logSNR-even steps: the data's spread within 2 % at 20 evaluations,
    # where DDIM is 12 % off (and DDPM, by its exact law, 9 %).
    offset, gain, evals = output_law("dpm++2m", chain("dpm++2m", 20, "logsnr"))
    assert evals == 20 and std_error(gain) < 0.02
    np.testing.assert_allclose(offset, exact_flow(BASE)[0], atol=3e-3)
    ddim_error = std_error(output_law("ddim", chain("ddim", 20, "logsnr"))[1])
    assert std_error(gain) < ddim_error / 5
    # Heun at 19 evaluations (10 levels) beats DDIM at 20.
    _, heun_gain, evals = output_law("heun", chain("heun", 20))
    assert evals == 19 and std_error(heun_gain) < 0.1
    assert std_error(heun_gain) < std_error(output_law("ddim", chain("ddim", 20))[1])
    # ... and reaches 2 % at 39.
    assert std_error(output_law("heun", chain("heun", 39))[1]) < 0.025


def test_samples_reproduce_the_data_moments():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20_000, 2, 1, 1, generator=g)
    mu, s = MU.flatten().numpy(), S.flatten().numpy()
    runs = {
        "dpm++2m": dpm_solver_2m_sample(
            chain("dpm++2m", 20, "logsnr"), optimal_eps, x_T, clip_denoised=False
        ),
        # Heun with churn (γ = 0.24): fresh noise at every level, drawn from the generator.
        "heun": heun_sample(
            chain("heun", 99),
            optimal_eps,
            x_T,
            s_churn=12.0,
            noise_levels=BASE,
            clip_denoised=False,
            generator=g,
        ),
    }
    for name, result in runs.items():
        x = result.sample.flatten(1).double().numpy()
        np.testing.assert_allclose(x.mean(0), mu, atol=0.03, err_msg=name)
        np.testing.assert_allclose(x.std(0), s, rtol=0.04, err_msg=name)


def test_sde_solver_reproduces_the_data_and_beats_ddpm_at_twenty_evaluations():
    # SDE-DPM-Solver++(2M) draws fresh noise each step, so its output law is not affine; 20,000
    # samples estimate its moments to about 0.5 %.
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20_000, 2, 1, 1, generator=g)
    mu = MU.flatten().numpy()

    def moments(name: str, evals: int):
        result = get_sampler(name)(
            chain(name, evals, "logsnr"),
            optimal_eps,
            x_T,
            clip_denoised=False,
            generator=torch.Generator().manual_seed(1),
        )
        assert result.num_model_evals == evals
        x = result.sample.flatten(1).double().numpy()
        return np.abs(x.mean(0) - mu).max(), std_error(x.std(0))

    mean_error, spread_error = moments("dpm++2m-sde", 20)
    assert mean_error < 0.02 and spread_error < 0.06
    # DDPM at the same budget misses the spread by about 12 %; the SDE solver by at most half.
    assert spread_error < moments("ddpm", 20)[1] / 2
    # ... and it converges as the steps shrink.
    assert moments("dpm++2m-sde", 100)[1] < 0.015


def test_sde_solver_noise_is_per_image_and_eta_zero_is_the_ode_solver():
    d = chain("dpm++2m", 8, "logsnr")

    def generators(ids):
        return [torch.Generator().manual_seed(200 + i) for i in ids]

    x_T = randn((4, 2, 1, 1), generator=generators(range(4)))
    sde = get_sampler("dpm++2m-sde")
    whole = sde(d, optimal_eps, x_T, generator=generators(range(4)), clip_denoised=False).sample
    part = sde(d, optimal_eps, x_T[1:3], generator=generators([1, 2]), clip_denoised=False)
    torch.testing.assert_close(part.sample, whole[1:3])
    ode = dpm_solver_2m_sample(d, optimal_eps, x_T, clip_denoised=False).sample
    assert (ode - whole).abs().max() > 1e-2
    with_zero = dpm_solver_2m_sample(d, optimal_eps, x_T, eta=0.0, clip_denoised=False).sample
    torch.testing.assert_close(with_zero, ode, rtol=0, atol=0)
    with pytest.raises(ValueError, match="eta"):
        dpm_solver_2m_sample(d, optimal_eps, x_T, eta=-1.0)


# -- parameterisations, churn, per-image noise -------------------------------------------------


def _as(mean_type: ModelMeanType, var_type: ModelVarType, d: Diffusion):
    """The same optimal predictor written as x_0 and/or with learned-variance channels."""

    def model_fn(x, t_model, **_):
        eps = optimal_eps(x, t_model)
        a2 = torch.from_numpy(BASE.alphas_cumprod)[t_model].float().view(-1, 1, 1, 1)
        out = eps if mean_type == ModelMeanType.EPSILON else (x - (1 - a2).sqrt() * eps) / a2.sqrt()
        if var_type == ModelVarType.LEARNED_RANGE:
            out = torch.cat([out, torch.full_like(out, 0.3)], dim=1)
        return out

    chain = Diffusion(
        d.betas,
        mean_type=mean_type,
        var_type=var_type,
        timestep_map=d.timestep_map,
        original_num_steps=1000,
    )
    return chain, model_fn


@pytest.mark.parametrize("name", ["dpm++2m", "heun"])
def test_x0_and_learned_variance_models_give_the_same_samples(name):
    d = chain(name, 15)
    x_T = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    reference = get_sampler(name)(d, optimal_eps, x_T, clip_denoised=False).sample
    for mean_type in (ModelMeanType.EPSILON, ModelMeanType.START_X):
        for var_type in (ModelVarType.FIXED_LARGE, ModelVarType.LEARNED_RANGE):
            other, model_fn = _as(mean_type, var_type, d)
            sample = get_sampler(name)(other, model_fn, x_T, clip_denoised=False).sample
            torch.testing.assert_close(sample, reference, atol=2e-4, rtol=1e-4)


def test_heun_churn_rounds_to_trained_levels_and_its_noise_is_per_image():
    d = chain("heun", 11)
    seen = []

    def model_fn(x, t):
        seen.append(int(t[0]))
        return optimal_eps(x, t)

    def generators(ids):
        return [torch.Generator().manual_seed(100 + i) for i in ids]

    x_T = randn((4, 2, 1, 1), generator=generators(range(4)))
    options = dict(s_churn=20.0, noise_levels=BASE, clip_denoised=False)
    whole = heun_sample(d, model_fn, x_T, generator=generators(range(4)), **options)
    # Churned levels are trained steps between the chain's own.
    assert set(seen) - set(d.timestep_map.tolist()) and whole.num_model_evals == 11
    part = heun_sample(d, optimal_eps, x_T[1:3], generator=generators([1, 2]), **options).sample
    torch.testing.assert_close(part, whole.sample[1:3])
    plain = heun_sample(d, optimal_eps, x_T, clip_denoised=False).sample
    assert (plain - whole.sample).abs().max() > 1e-3
    with pytest.raises(ValueError, match="every step"):
        heun_sample(BASE, optimal_eps, x_T, noise_levels=d)
