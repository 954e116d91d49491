"""Guidance wrappers: classifier-free guidance, classifier guidance through the score, guidance
intervals and dynamic thresholding: identities, closed forms, and guided Gaussian sampling."""

import math

import pytest
import torch

from admkit.diffusion import Diffusion, DiffusionConfig, ModelMeanType, ModelVarType, respace
from admkit.guidance import (
    classifier_free_model,
    classifier_grad_fn,
    classifier_score_model,
    dynamic_threshold,
    guidance_interval,
    guided_by_model,
    original_steps,
    zero_cond_fn,
)
from admkit.samplers import SAMPLERS, get_sampler, levels_for_steps
from admkit.step_selection import select_timesteps

MU = torch.tensor([0.3, -0.4]).view(1, 2, 1, 1)
S = torch.tensor([0.5, 1.0]).view(1, 2, 1, 1)
BASE = Diffusion.from_config(DiffusionConfig())
ALPHA_BAR = torch.from_numpy(BASE.alphas_cumprod)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def optimal_eps(x, t_model, **_):
    a2 = ALPHA_BAR[t_model].double().view(-1, 1, 1, 1)
    a, b = a2.sqrt(), (1 - a2).sqrt()
    return (b / (a2 * S.double() ** 2 + b**2) * (x.double() - a * MU.double())).float()


def chain(sampler: str, evals: int) -> Diffusion:
    return respace(BASE, select_timesteps(BASE, levels_for_steps(sampler, evals)))


class LabelModel:
    """A toy class-conditional model with learned-variance channels, recording its calls."""

    def __init__(self, label_in_variance: bool = True):
        self.calls = []
        self.label_in_variance = label_in_variance

    def __call__(self, x, t, y=None, low_res=None):
        self.calls.append({"n": len(x), "y": y.clone(), "low_res": low_res})
        shift = y.float().view(-1, 1, 1, 1)
        mean = x * (1 + 0.1 * shift) + shift
        v_shift = shift if self.label_in_variance else 0
        v = torch.tanh(v_shift + t.float().view(-1, 1, 1, 1) / 1000).expand_as(x)
        return torch.cat([mean, v], dim=1)


# -- classifier-free guidance --------------------------------------------------------------------


def test_cfg_is_one_batched_call_and_interpolates_the_two_branches():
    model = LabelModel()
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    y, null = torch.tensor([0, 2, 1]), 9
    low_res = torch.randn(3, 2, 2, 2)
    cond = model(x, t, y=y)
    uncond = model(x, t, y=torch.full_like(y, null))
    model.calls.clear()
    for w in (0.0, 1.0, 3.0):
        out = classifier_free_model(model, w, null)(x, t, y=y, low_res=low_res)
        call = model.calls.pop()
        assert call["n"] == 6 and torch.equal(call["y"], torch.tensor([0, 2, 1, 9, 9, 9]))
        assert torch.equal(call["low_res"], torch.cat([low_res, low_res]))
        # The identities hold exactly: w = 1 is the conditional model, w = 0 the unconditional.
        expected = {0.0: uncond[:, :2], 1.0: cond[:, :2]}.get(
            w, uncond[:, :2] + w * (cond - uncond)[:, :2]
        )
        torch.testing.assert_close(
            out[:, :2], expected, atol=0 if w in (0.0, 1.0) else 1e-5, rtol=0
        )
        assert torch.equal(out[:, 2:], cond[:, 2:])  # learned variance from the conditional pass
    with pytest.raises(ValueError, match="needs class labels"):
        classifier_free_model(model, 2.0, null)(x, t)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_cfg_at_one_samples_the_conditional_model_and_at_zero_the_unconditional(name):
    d = Diffusion(
        chain(name, 7).betas,
        var_type=ModelVarType.LEARNED_RANGE,
        timestep_map=chain(name, 7).timestep_map,
        original_num_steps=1000,
    )
    x_T = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    y, null = torch.tensor([1, 0, 3, 2]), 7

    def run(model_fn, labels):
        return get_sampler(name)(
            d, model_fn, x_T, model_kwargs={"y": labels}, generator=torch.Generator().manual_seed(1)
        ).sample

    # CFG takes Σ_θ from the conditional pass, so at w = 0 it equals the unconditional model
    # only where the variance does not depend on the label.
    model = LabelModel(label_in_variance=False)
    torch.testing.assert_close(run(classifier_free_model(model, 1.0, null), y), run(model, y))
    torch.testing.assert_close(
        run(classifier_free_model(model, 0.0, null), y), run(model, torch.full_like(y, null))
    )


# -- guidance by a second model (autoguidance) ---------------------------------------------------


def test_model_guidance_interpolates_the_means_and_keeps_the_main_variance():
    main, guide = LabelModel(), LabelModel(label_in_variance=False)

    def smaller(x, t, **kwargs):  # a guide of another kind: no variance channels, other mean
        return 0.5 * guide(x, t, **kwargs)[:, :2]

    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 6, 7])
    y, low_res = torch.tensor([0, 2, 1]), torch.randn(3, 2, 2, 2)
    d_1, d_0 = main(x, t, y=y), smaller(x, t, y=y)
    for w, expected in [(1.0, d_1[:, :2]), (0.0, d_0), (2.5, d_0 + 2.5 * (d_1[:, :2] - d_0))]:
        main.calls.clear()
        guide.calls.clear()
        out = guided_by_model(main, smaller, w)(x, t, y=y, low_res=low_res)
        # w = 1 is the main model bit for bit, w = 0 the guide; elsewhere the line through both.
        torch.testing.assert_close(out[:, :2], expected, atol=0 if w in (0, 1) else 1e-5, rtol=0)
        assert torch.equal(out[:, 2:], d_1[:, 2:])  # learned variance: the main model's
        for calls in (main.calls, guide.calls):  # both saw the same labels and inputs
            assert len(calls) == 1 and torch.equal(calls[0]["y"], y)
            assert torch.equal(calls[0]["low_res"], low_res)


def _eps_believing(mean, std):
    """E[ε | x_t] of a denoiser that takes the data for N(mean, std²): a model whose error is
    of this kind (here: too wide, as a model trained for less long is)."""

    def eps(x, t_model, **_):
        a2 = ALPHA_BAR[t_model].double().view(-1, 1, 1, 1)
        a, b = a2.sqrt(), (1 - a2).sqrt()
        return (b / (a2 * std.double() ** 2 + b**2) * (x.double() - a * mean.double())).float()

    return eps


def _output_law(name: str, model_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, gain) per dimension: a deterministic solver maps x_T to offset + gain·x_T when
    the model is linear in x_t, so two starting points give the law of every sample."""
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 2, 1, 1)
    out = get_sampler(name)(chain(name, 50), model_fn, x, clip_denoised=False).sample.view(2, 2)
    return out[0].double(), (out[1] - out[0]).double()


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "heun"])
def test_a_guide_with_a_larger_error_of_the_same_kind_corrects_the_model(name):
    # The model is 20% too wide and 0.1 off in mean; the guide makes the same errors, doubled.
    main = _eps_believing(MU + 0.1, S * 1.2)
    guide = _eps_believing(MU + 0.2, S * 1.44)

    reference_offset, reference_gain = _output_law(name, optimal_eps)

    def error(model_fn) -> float:
        # x_T ~ N(0, 1) gives samples ~ N(offset, gain²): compare with what the solver gives for
        # the exact denoiser, so that only the model's error is measured, not the solver's.
        offset, gain = _output_law(name, model_fn)
        mean_error = (offset - reference_offset).abs().max()
        std_error = (gain.abs() / reference_gain.abs() - 1).abs().max()
        return max(mean_error.item(), std_error.item())

    unguided = error(main)
    assert unguided > 0.09
    assert error(guided_by_model(main, guide, 1.0)) == unguided
    # D_w = D_0 + w (D_1 - D_0) cancels the first-order error at w = 2.
    assert error(guided_by_model(main, guide, 2.0)) < 0.25 * unguided
    assert error(guided_by_model(main, guide, 1.5)) < 0.7 * unguided
    assert error(guided_by_model(main, guide, 0.5)) > unguided  # towards the guide: worse


def test_model_guidance_composes_with_classifier_guidance_and_the_interval():
    main, guide = _eps_believing(MU, S * 1.2), _eps_believing(MU, S * 1.5)
    g = torch.tensor([0.7, -1.3]).view(1, 2, 1, 1)

    def constant(x, t_model, **_):
        return g.expand_as(x)

    x, t = torch.randn(3, 2, 1, 1), torch.tensor([999, 473, 10])
    guided = guided_by_model(main, guide, 3.0)
    # Classifier guidance through the score shifts the guided ε̂ by √(1 - ᾱ_t) g.
    shift = (1 - ALPHA_BAR[t]).sqrt().float().view(-1, 1, 1, 1) * g
    both = classifier_score_model(guided, constant, BASE)(x, t)
    torch.testing.assert_close(both, guided(x, t) - shift)
    # Inside [100, 500] the guided model, outside it the main model, image by image.
    limited = guidance_interval(guided, main, BASE, 100, 500)(x, t)
    torch.testing.assert_close(limited[1:2], guided(x, t)[1:2])
    torch.testing.assert_close(limited[[0, 2]], main(x, t)[[0, 2]])
    assert not torch.allclose(guided(x, t)[[0, 2]], main(x, t)[[0, 2]])


# -- classifier guidance through the score -------------------------------------------------------


def test_score_wrapper_shifts_eps_by_the_scaled_gradient_at_original_steps():
    d = chain("dpm++2m", 20)
    g = torch.tensor([0.7, -1.3]).view(1, 2, 1, 1)
    seen = []

    def constant(x, t_model, **kwargs):
        seen.append(t_model)
        return g.expand_as(x)

    x, t_model = torch.randn(3, 2, 1, 1), torch.tensor([999, 473, 0])
    out = classifier_score_model(optimal_eps, constant, BASE)(x, t_model)
    expected = (
        optimal_eps(x, t_model) - (1 - ALPHA_BAR[t_model]).sqrt().float().view(-1, 1, 1, 1) * g
    )
    torch.testing.assert_close(out, expected)
    assert torch.equal(seen[0], t_model)
    # A chain lacking a step refuses it rather than guessing its ᾱ.
    with pytest.raises(ValueError, match="lacks"):
        classifier_score_model(optimal_eps, constant, d)(x, torch.tensor([998, 998, 998]))


def test_score_wrapper_with_rescaled_timesteps_finds_the_original_step():
    d = Diffusion.from_config(DiffusionConfig(diffusion_steps=400, rescale_timesteps=True))
    t = torch.tensor([0, 17, 399])
    torch.testing.assert_close(original_steps(d, d.model_timesteps(t)), t)


def _x0_model(x, t_model, **_):
    a2 = ALPHA_BAR[t_model].float().view(-1, 1, 1, 1)
    return (x - (1 - a2).sqrt() * optimal_eps(x, t_model)) / a2.sqrt()


@pytest.mark.parametrize("name", ["dpm++2m", "heun"])
def test_x0_models_are_guided_like_eps_models_and_variance_passes_through(name):
    eps_chain = chain(name, 11)
    x0_chain = Diffusion(
        eps_chain.betas,
        mean_type=ModelMeanType.START_X,
        timestep_map=eps_chain.timestep_map,
        original_num_steps=1000,
    )
    learned = Diffusion(
        eps_chain.betas,
        var_type=ModelVarType.LEARNED_RANGE,
        timestep_map=eps_chain.timestep_map,
        original_num_steps=1000,
    )
    gradient = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1)

    def cond_fn(x, t, **_):
        return gradient.expand_as(x)

    def with_v(x, t, **_):
        return torch.cat([optimal_eps(x, t), torch.full_like(x, 0.25)], dim=1)

    x_T = torch.randn(32, 2, 1, 1, generator=torch.Generator().manual_seed(2))
    runs = [
        get_sampler(name)(c, fn, x_T, cond_fn=cond_fn, clip_denoised=False).sample
        for c, fn in ((eps_chain, optimal_eps), (x0_chain, _x0_model), (learned, with_v))
    ]
    torch.testing.assert_close(runs[1], runs[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(runs[2], runs[0])
    out = classifier_score_model(with_v, cond_fn, BASE)(x_T[:2], torch.tensor([10, 10]))
    assert torch.equal(out[:, 2:], torch.full((2, 2, 1, 1), 0.25))
    plain = get_sampler(name)(eps_chain, optimal_eps, x_T, clip_denoised=False).sample
    assert (runs[0] - plain).abs().max() > 0.05


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_a_zero_classifier_gradient_changes_nothing(name):
    d = chain(name, 9)
    x_T = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    runs = [
        get_sampler(name)(
            d, optimal_eps, x_T, cond_fn=fn, generator=torch.Generator().manual_seed(4)
        ).sample
        for fn in (None, zero_cond_fn)
    ]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-6, rtol=0)


class LinearClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.T


@pytest.mark.parametrize("name", ["dpm++2m", "heun"])
def test_a_linear_classifier_moves_ode_samples_toward_its_class(name):
    d = chain(name, 15)
    classifier = LinearClassifier()
    x_T = torch.randn(2000, 2, 1, 1, generator=torch.Generator().manual_seed(5))
    kwargs = {"y": torch.ones(2000, dtype=torch.long)}  # class 1 likes x_1 - x_0 large
    accuracy = {}
    for scale in (0.0, 3.0):
        x = get_sampler(name)(
            d, optimal_eps, x_T, model_kwargs=kwargs, cond_fn=classifier_grad_fn(classifier, scale)
        ).sample
        accuracy[scale] = ((x.flatten(1) @ classifier.weight.T).argmax(-1) == 1).float().mean()
    assert accuracy[3.0] > accuracy[0.0] + 0.3


# -- guidance interval, dynamic thresholding -----------------------------------------------------


def test_guidance_interval_guides_only_inside_and_calls_only_what_is_needed():
    calls = []

    def guided(x, t, **_):
        calls.append("guided")
        return torch.ones_like(x)

    def unguided(x, t, **_):
        calls.append("plain")
        return torch.zeros_like(x)

    limited = guidance_interval(guided, unguided, BASE, 100, 500)
    x = torch.randn(3, 2, 1, 1)
    assert torch.equal(limited(x, torch.tensor([100, 300, 500])), torch.ones_like(x))
    assert calls == ["guided"]
    assert torch.equal(limited(x, torch.tensor([99, 501, 999])), torch.zeros_like(x))
    assert calls == ["guided", "plain"]
    mixed = limited(x, torch.tensor([50, 200, 700])).flatten(1)[:, 0]
    assert mixed.tolist() == [0.0, 1.0, 0.0]


def test_dynamic_threshold_matches_imagen():
    threshold = dynamic_threshold(0.9)
    inside = torch.linspace(-1, 1, 50).view(1, 2, 5, 5)
    assert torch.equal(threshold(inside), inside)  # s = max(1, ...) = 1: a plain clip, a no-op
    big = 3 * torch.linspace(-1, 1, 51)[1:].view(1, 2, 5, 5)
    s = torch.quantile(big.abs().flatten(), 0.9)
    expected = big.clamp(-s, s) / s
    out = threshold(torch.cat([big, inside]))
    torch.testing.assert_close(out[:1], expected)
    torch.testing.assert_close(out[1:], inside)  # per image: the other image's s is its own
    assert out.abs().max() <= 1 + 1e-6 and math.isclose(out[:1].abs().max().item(), 1.0)
    with pytest.raises(ValueError):
        dynamic_threshold(1.5)
