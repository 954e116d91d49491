"""admkit.compat's diffusion object against vectors made by running guided-diffusion itself.

``diffusion_a.pt`` is the 64x64 class-conditional case (cosine, learned sigma, respaced
``ddim10``) with ``unet_a``'s weights and ``classifier_a`` as guide; ``diffusion_sr_a.pt`` the
super-resolution case (linear, ``ddim5``). Tolerances follow conformance/README.md: 1e-4
relative for one evaluation, 1e-3 for whole sampling loops.
"""

import numpy as np
import pytest
import torch

from admkit.compat import (
    create_classifier,
    create_model_and_diffusion,
    sr_create_model_and_diffusion,
)
from admkit.compat.gaussian_diffusion import (
    LossSecondMomentResampler,
    LossType,
    ModelMeanType,
    ModelVarType,
    UniformSampler,
    create_gaussian_diffusion,
    create_named_schedule_sampler,
    space_timesteps,
)
from admkit.errors import UserError
from admkit.guidance import classifier_grad_fn
from conformance_loader import load_case


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| <= tol * max |expected| (relative to the tensor's scale)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= tol * scale, f"max error {error:.3g} > {tol} x {scale:.3g}"


def _build(case_name: str, weights_name: str):
    case, weights = load_case(case_name), load_case(weights_name)
    # The diffusion cases store no weights of their own: they reuse their model case's.
    assert case["flags"] == weights["flags"]
    if "kw_y" in case:
        model, diffusion = create_model_and_diffusion(**case["flags"])
        model_kwargs = {"y": case["kw_y"]}
    else:
        model, diffusion = sr_create_model_and_diffusion(**case["flags"])
        model_kwargs = {"low_res": case["kw_low_res"]}
    model.load_state_dict(weights["state_dict"])
    model.eval()
    return case, model, diffusion, model_kwargs


@pytest.fixture(
    scope="module", params=[("diffusion_a.pt", "unet_a.pt"), ("diffusion_sr_a.pt", "sr_a.pt")]
)
def built(request):
    torch.set_num_threads(1)
    return _build(*request.param)


@pytest.fixture(scope="module")
def guided():
    case, model, diffusion, model_kwargs = _build("diffusion_a.pt", "unet_a.pt")
    weights = load_case("classifier_a.pt")
    classifier = create_classifier(**weights["flags"])
    classifier.load_state_dict(weights["state_dict"])
    classifier.eval()
    cond_fn = classifier_grad_fn(classifier, float(case["guide_scale"]))
    return case, model, diffusion, model_kwargs, cond_fn


def test_arrays_and_timestep_map(built):
    case, _, diffusion, _ = built
    np.testing.assert_allclose(diffusion.betas, case["betas"].numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        diffusion.alphas_cumprod, case["alphas_cumprod"].numpy(), rtol=1e-12, atol=0
    )
    assert diffusion.timestep_map == case["timestep_map"].tolist()
    assert diffusion.alphas_cumprod.dtype == np.float64
    assert diffusion.num_timesteps == len(case["betas"])
    assert diffusion.original_num_steps == case["flags"]["diffusion_steps"]


def test_forward_process_and_posterior(built):
    case, _, diffusion, _ = built
    x_t = diffusion.q_sample(case["x0"], case["t"], noise=case["noise"])
    assert_rel(x_t, case["q_sample"], 1e-5)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(case["x0"], x_t, case["t"])
    assert_rel(mean, case["posterior_mean"], 1e-5)
    assert_rel(variance, case["posterior_variance"], 1e-5)
    assert_rel(log_variance, case["posterior_log_variance"], 1e-5)


def test_p_mean_variance(built):
    case, model, diffusion, model_kwargs = built
    x_t = diffusion.q_sample(case["x0"], case["t"], noise=case["noise"])
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x_t, case["t"], model_kwargs=model_kwargs)
    assert set(out) == {"mean", "variance", "log_variance", "pred_xstart"}
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert_rel(out[key], case[f"pmv_{key}"], 1e-4)


def test_training_losses(built):
    case, model, diffusion, model_kwargs = built
    with torch.no_grad():
        losses = diffusion.training_losses(
            model, case["x0"], case["t"], model_kwargs=model_kwargs, noise=case["noise"]
        )
    assert set(losses) == {"vb", "mse", "loss"}
    for key in ("vb", "mse", "loss"):
        assert_rel(losses[key], case[f"loss_{key}"], 1e-4)


def test_ddim_loop_and_reverse(built):
    case, model, diffusion, model_kwargs = built
    sample = diffusion.ddim_sample_loop(
        model, tuple(case["x0"].shape), noise=case["noise"], model_kwargs=model_kwargs
    )
    assert_rel(sample, case["ddim_loop"], 1e-3)
    with torch.no_grad():
        out = diffusion.ddim_reverse_sample(model, case["x0"], case["t"], model_kwargs=model_kwargs)
    assert_rel(out["sample"], case["ddim_reverse"], 1e-4)


def test_condition_mean_and_score(guided):
    case, model, diffusion, model_kwargs, cond_fn = guided
    x_t = diffusion.q_sample(case["x0"], case["t"], noise=case["noise"])
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x_t, case["t"], model_kwargs=model_kwargs)
    mean = diffusion.condition_mean(cond_fn, out, x_t, case["t"], model_kwargs=model_kwargs)
    assert_rel(mean, case["cond_mean"], 1e-4)
    # The shift is ~4e-4 of the mean: check it on its own, so a missing one cannot pass.
    assert_rel(mean - out["mean"], case["cond_mean"] - case["pmv_mean"], 1e-2)

    scored = diffusion.condition_score(cond_fn, out, x_t, case["t"], model_kwargs=model_kwargs)
    assert_rel(scored["mean"], case["cond_score_mean"], 1e-4)
    assert_rel(scored["pred_xstart"], case["cond_score_pred_xstart"], 1e-4)
    assert_rel(
        scored["pred_xstart"] - out["pred_xstart"],
        case["cond_score_pred_xstart"] - case["pmv_pred_xstart"],
        1e-2,
    )
    assert scored["variance"] is out["variance"]


def test_guided_ddim_loop(guided):
    case, model, diffusion, model_kwargs, cond_fn = guided
    sample = diffusion.ddim_sample_loop(
        model,
        tuple(case["x0"].shape),
        noise=case["noise"],
        model_kwargs=model_kwargs,
        cond_fn=cond_fn,
    )
    assert_rel(sample, case["guided_ddim_loop"], 1e-3)
    assert_rel(sample - case["ddim_loop"], case["guided_ddim_loop"] - case["ddim_loop"], 2e-2)


def test_spacing_strings():
    case = torch.load("tests/conformance/spacing.pt", weights_only=True)
    strings = [key for key in case if isinstance(case[key], torch.Tensor)]
    assert strings, "no spacing vectors found"
    for string in strings:
        assert sorted(space_timesteps(1000, string)) == case[string].tolist(), string


# -- the API around the vectors -----------------------------------------------------------


def test_flags_select_enums_as_the_original():
    d = create_gaussian_diffusion()
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.EPSILON,
        ModelVarType.FIXED_LARGE,
        LossType.MSE,
    )
    assert d.num_timesteps == 1000 and d.timestep_map == list(range(1000))
    assert create_gaussian_diffusion(learn_sigma=True).model_var_type == ModelVarType.LEARNED_RANGE
    assert create_gaussian_diffusion(sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    assert create_gaussian_diffusion(predict_xstart=True).model_mean_type == ModelMeanType.START_X
    assert create_gaussian_diffusion(use_kl=True).loss_type == LossType.RESCALED_KL
    assert create_gaussian_diffusion(rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    both = create_gaussian_diffusion(use_kl=True, rescale_learned_sigmas=True)
    assert both.loss_type == LossType.RESCALED_KL


class _Recorder(torch.nn.Module):
    """A zero-ε model that records the timesteps it is called with."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return x * self.scale


def test_loops_give_the_model_original_timesteps():
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="ddim5")
    model = _Recorder()
    steps = list(diffusion.p_sample_loop_progressive(model, (2, 1, 2, 2)))
    assert len(steps) == 5 and set(steps[0]) == {"sample", "pred_xstart"}
    assert [int(t[0]) for t in model.seen] == [80, 60, 40, 20, 0]
    assert model.seen[0].dtype == torch.int64

    rescaled = create_gaussian_diffusion(
        steps=4000, timestep_respacing="ddim4", rescale_timesteps=True
    )
    model = _Recorder()
    rescaled.ddim_sample_loop(model, (1, 1, 2, 2))
    assert [float(t[0]) for t in model.seen] == [750.0, 500.0, 250.0, 0.0]


def test_ddim_reverse_rejects_eta():
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="10")
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="Reverse ODE only for deterministic path"):
        diffusion.ddim_reverse_sample(_Recorder(), x, torch.tensor([3]), eta=0.5)


def test_calc_bpd_loop_shapes_and_order():
    diffusion = create_gaussian_diffusion(steps=100, timestep_respacing="5")
    model = _Recorder()
    out = diffusion.calc_bpd_loop(model, torch.rand(3, 1, 4, 4) * 2 - 1)
    assert set(out) == {"total_bpd", "prior_bpd", "vb", "xstart_mse", "mse"}
    assert out["vb"].shape == (3, 5) and out["total_bpd"].shape == (3,)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(dim=1) + out["prior_bpd"])
    assert [int(t[0]) for t in model.seen] == [99, 74, 50, 25, 0]


def test_schedule_samplers():
    diffusion = create_gaussian_diffusion(steps=50)
    uniform = create_named_schedule_sampler("uniform", diffusion)
    assert isinstance(uniform, UniformSampler) and uniform.diffusion is diffusion
    t, weights = uniform.sample(8, "cpu")
    assert t.dtype == torch.int64 and ((t >= 0) & (t < 50)).all()
    assert torch.equal(weights, torch.ones(8))
    resampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(resampler, LossSecondMomentResampler)
    # Works without torch.distributed initialised, on any NumPy.
    resampler.update_with_local_losses(torch.tensor([1, 2]), torch.tensor([0.5, 1.5]))
    assert resampler._loss_counts[1] == 1 and resampler._loss_history[2, 0] == 1.5
    with pytest.raises(UserError, match="unknown schedule sampler"):
        create_named_schedule_sampler("importance", diffusion)
