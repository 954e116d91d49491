"""The conformance vectors on a GPU: the networks and the diffusion object agree with the
original there too, in float32 and within half precision's rounding in bf16/fp16.

Marked ``gpu``: left out of the default run (see pyproject.toml) and run by
``benchmarks/gpu_check.sh`` as ``pytest -m gpu``. ``ADMKIT_GPU_TEST_DEVICE=cpu pytest -m gpu``
runs them on the CPU, which checks the tests themselves on a machine without a GPU.
"""

import os

import pytest
import torch

from admkit.compat import (
    create_classifier,
    create_model_and_diffusion,
    sr_create_model_and_diffusion,
)
from admkit.guidance import classifier_grad_fn
from conformance_loader import load_case

pytestmark = pytest.mark.gpu

DEVICE = torch.device(os.environ.get("ADMKIT_GPU_TEST_DEVICE", "cuda"))


@pytest.fixture(autouse=True)
def exact_float32():
    """The device present, and float32 kept float32 (CUDA convolutions default to TF32)."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("no CUDA device: run these where one is, or set ADMKIT_GPU_TEST_DEVICE=cpu")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_device(case: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def network(name: str):
    case = on_device(load_case(name))
    if name == "classifier_a.pt":
        model, kwargs = create_classifier(**case["flags"]), {}
    elif name == "sr_a.pt":
        model, _ = sr_create_model_and_diffusion(**case["flags"])
        kwargs = {"low_res": case["kw_low_res"]}
    else:
        model, _ = create_model_and_diffusion(**case["flags"])
        kwargs = {"y": case["kw_y"]}
    model.load_state_dict(case["state_dict"], strict=True)
    return model.to(DEVICE).eval(), case, kwargs


@pytest.mark.parametrize("name", ["unet_a.pt", "classifier_a.pt", "sr_a.pt"])
def test_networks_match_the_original_in_float32(name):
    model, case, kwargs = network(name)
    with torch.no_grad():
        out = model(case["x"], case["t"], **kwargs)
    assert out.device.type == DEVICE.type
    assert relative_error(out, case["out"]) < 1e-4


@pytest.mark.parametrize("dtype, limit", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_stays_within_its_rounding(dtype, limit):
    # bf16 keeps 8 significant bits, fp16 11: a few roundings of each through the network.
    model, case, kwargs = network("unet_a.pt")
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype):
        out = model(case["x"], case["t"], **kwargs)
    assert out.dtype == dtype
    assert relative_error(out.float(), case["out"]) < limit


def test_diffusion_matches_the_original_with_guidance():
    model, _, _ = network("unet_a.pt")
    case = on_device(load_case("diffusion_a.pt"))
    kwargs = {"y": case["kw_y"]}  # the diffusion case's own labels
    _, diffusion = create_model_and_diffusion(**case["flags"])
    classifier, _, _ = network("classifier_a.pt")
    cond_fn = classifier_grad_fn(classifier, float(case["guide_scale"]))
    x_t = diffusion.q_sample(case["x0"], case["t"], noise=case["noise"])
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, x_t, case["t"], model_kwargs=kwargs)
        losses = diffusion.training_losses(
            model, case["x0"], case["t"], model_kwargs=kwargs, noise=case["noise"]
        )
    for key in ("mean", "variance", "pred_xstart"):
        assert relative_error(out[key], case[f"pmv_{key}"]) < 1e-4, key
    for key in ("vb", "mse", "loss"):
        assert relative_error(losses[key], case[f"loss_{key}"]) < 1e-4, key
    mean = diffusion.condition_mean(cond_fn, out, x_t, case["t"], model_kwargs=kwargs)
    assert relative_error(mean - out["mean"], case["cond_mean"] - case["pmv_mean"]) < 1e-2
    sample = diffusion.ddim_sample_loop(
        model,
        tuple(case["x0"].shape),
        noise=case["noise"],
        model_kwargs=kwargs,
        cond_fn=cond_fn,
        device=DEVICE,
    )
    assert sample.device.type == DEVICE.type
    assert relative_error(sample, case["guided_ddim_loop"]) < 1e-3
    # the guidance's own share of the result, so that an ignored cond_fn cannot pass
    shift = case["guided_ddim_loop"] - case["ddim_loop"]
    assert relative_error(sample - case["ddim_loop"], shift) < 2e-2
