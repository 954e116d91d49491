"""The networks through ``admkit.compat`` against vectors made by running guided-diffusion."""

import argparse
import math

import pytest
import torch

from admkit.compat import (
    add_dict_to_argparser,
    args_to_dict,
    create_classifier,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
    str2bool,
)
from admkit.errors import UserError
from admkit.nn import qkv_attention, timestep_embedding
from conformance_loader import load_case


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def loaded(model: torch.nn.Module, case: dict) -> torch.nn.Module:
    model.load_state_dict(case["state_dict"], strict=True)
    return model.eval()


def test_unet_matches_original():
    case = load_case("unet_a.pt")
    model, diffusion = create_model_and_diffusion(**case["flags"])
    assert diffusion.num_timesteps == 10  # the flags' timestep_respacing "ddim10" reached it
    # the released checkpoints' key order, not only the same set of keys
    assert list(model.state_dict()) == list(case["state_dict"])
    with torch.no_grad():
        out = loaded(model, case)(case["x"], case["t"], y=case["kw_y"])
    assert out.shape == case["out"].shape
    assert relative_error(out, case["out"]) < 1e-4


def test_classifier_matches_original():
    case = load_case("classifier_a.pt")
    model = create_classifier(**case["flags"])
    assert list(model.state_dict()) == list(case["state_dict"])
    with torch.no_grad():
        out = loaded(model, case)(case["x"], case["t"])
    assert relative_error(out, case["out"]) < 1e-4


def test_super_res_matches_original():
    case = load_case("sr_a.pt")
    model, diffusion = sr_create_model_and_diffusion(**case["flags"])
    assert diffusion.num_timesteps == 5  # "ddim5"
    assert list(model.state_dict()) == list(case["state_dict"])
    with torch.no_grad():
        out = loaded(model, case)(case["x"], case["t"], low_res=case["kw_low_res"])
    assert relative_error(out, case["out"]) < 1e-4


def test_wrong_attention_order_loads_but_gives_other_outputs():
    # Same weights, same shapes, other qkv layout: the outputs must differ clearly, which is
    # why the order is part of a preset and the 64x64 model needs the new one.
    case = load_case("unet_a.pt")
    flags = dict(case["flags"], use_new_attention_order=False)
    model, _ = create_model_and_diffusion(**flags)
    with torch.no_grad():
        out = loaded(model, case)(case["x"], case["t"], y=case["kw_y"])
    assert relative_error(out, case["out"]) > 1e-3


def test_fresh_models_output_exact_zeros():
    model = create_model(16, 32, 1, learn_sigma=True, class_cond=True, attention_resolutions="8")
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([0, 999]), y=torch.tensor([1, 2]))
    assert out.shape == (2, 6, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))
    sr = sr_create_model(
        32, 16, 32, 1, False, False, False, "16", 2, -1, -1, True, 0.0, True, False
    )
    out = sr(torch.randn(1, 3, 32, 32), torch.tensor([5]), low_res=torch.randn(1, 3, 16, 16))
    assert torch.equal(out, torch.zeros_like(out))


def test_timestep_embedding_golden_values():
    # reference §3.9: cosines first, then sines; odd widths get a zero column
    emb = timestep_embedding(torch.tensor([1, 0]), 8)
    expected_t1 = [math.cos(1), math.cos(0.1), math.cos(0.01), math.cos(0.001)]
    expected_t1 += [math.sin(1), math.sin(0.1), math.sin(0.01), math.sin(0.001)]
    torch.testing.assert_close(emb[0], torch.tensor(expected_t1), atol=1e-6, rtol=0)
    torch.testing.assert_close(emb[1], torch.tensor([1.0] * 4 + [0.0] * 4))
    printed = [0.5403, 0.9950, 0.99995, 1.0, 0.84147, 0.099833, 0.0099998, 0.001]
    torch.testing.assert_close(emb[0], torch.tensor(printed), atol=1e-4, rtol=0)
    odd = timestep_embedding(torch.tensor([5]), 7)[0]
    printed_odd = [0.2837, 0.9732, 0.9999, -0.9589, 0.2300, 0.0108, 0.0]
    torch.testing.assert_close(odd, torch.tensor(printed_odd), atol=1e-4, rtol=0)
    half = timestep_embedding(torch.tensor([2.5]), 4)[0]  # fractional t (rescaled timesteps)
    expected_half = [math.cos(2.5), math.cos(0.025), math.sin(2.5), math.sin(0.025)]
    torch.testing.assert_close(half, torch.tensor(expected_half), atol=1e-6, rtol=0)


def einsum_attention(qkv: torch.Tensor, num_heads: int, new_order: bool) -> torch.Tensor:
    """The attention math written out per head with explicit channel ranges, in float64."""
    qkv = qkv.double()
    n, width, length = qkv.shape
    c = width // (3 * num_heads)
    heads = []
    for h in range(num_heads):
        if new_order:  # q = [0, C), k = [C, 2C), v = [2C, 3C); head h uses [c·h, c·(h+1)) of each
            q, k, v = (qkv[:, part * c * num_heads + h * c :][:, :c] for part in range(3))
        else:  # head h owns [3c·h, 3c·(h+1)) = its q, k, v
            block = qkv[:, 3 * c * h : 3 * c * (h + 1)]
            q, k, v = block[:, :c], block[:, c : 2 * c], block[:, 2 * c :]
        weights = torch.softmax(torch.einsum("nct,ncs->nts", q, k) / math.sqrt(c), dim=-1)
        heads.append(torch.einsum("nts,ncs->nct", weights, v))
    return torch.cat(heads, dim=1)


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_attention_equals_einsum_math(new_order):
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 4 * 8, 20)
    expected = einsum_attention(qkv, 4, new_order)
    out = qkv_attention(qkv, 4, new_order)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    # Half inputs: about one rounding of the half type away from exact math on the same
    # (rounded) input, as the original's half arithmetic with a float32 softmax is; a softmax
    # or a sum computed in half would be several roundings off.
    for dtype in (torch.float16, torch.bfloat16):
        rounded = qkv.to(dtype)
        out_half = qkv_attention(rounded, 4, new_order)
        assert out_half.dtype == dtype
        exact = einsum_attention(rounded.double(), 4, new_order)
        assert relative_error(out_half.double(), exact) < torch.finfo(dtype).eps
        # and its gradient (the CPU's half path has a backward of its own)
        probe = torch.randn(out_half.shape).to(dtype)
        leaf = rounded.clone().requires_grad_()
        (grad,) = torch.autograd.grad((qkv_attention(leaf, 4, new_order) * probe).sum(), leaf)
        exact_leaf = rounded.double().requires_grad_()
        exact_loss = (einsum_attention(exact_leaf, 4, new_order) * probe.double()).sum()
        (exact_grad,) = torch.autograd.grad(exact_loss, exact_leaf)
        assert grad.dtype == dtype
        assert relative_error(grad.double(), exact_grad) < 2 * torch.finfo(dtype).eps
    # the two layouts really are different functions of the same tensor
    other = einsum_attention(qkv, 4, not new_order)
    assert relative_error(out.double(), other) > 0.1


def test_channel_mult_beyond_the_original():
    # fractional multipliers, sizes without a default, and the small sizes we added
    model = create_model(24, 32, 1, channel_mult="1,2", attention_resolutions="12")
    assert model.input_blocks[0][0].weight.shape == (32, 3, 3, 3)
    assert model(torch.randn(1, 3, 24, 24), torch.tensor([3])).shape == (1, 3, 24, 24)
    model = create_model(16, 64, 1, channel_mult="0.5,1", attention_resolutions="8")
    assert model.input_blocks[0][0].weight.shape == (32, 3, 3, 3)
    for size, levels in [(8, 2), (16, 3), (32, 4)]:
        model = create_model(size, 32, 1, attention_resolutions="")
        assert len(model.input_blocks) == 1 + levels + (levels - 1)
    with pytest.raises(UserError, match="48"):
        create_model(48, 32, 1)
    with pytest.raises(UserError, match="multiple of 32"):
        create_model(128, 32, 1, channel_mult="0.5,1")  # 0.5 x 32 = 16 is not a GroupNorm width


def test_flag_dicts_and_argparser():
    flags = model_and_diffusion_defaults()
    assert flags["num_heads"] == 4 and flags["attention_resolutions"] == "16,8"
    assert flags["rescale_timesteps"] is False and flags["rescale_learned_sigmas"] is False
    sr_flags = sr_model_and_diffusion_defaults()
    assert not {"image_size", "channel_mult", "use_new_attention_order"} & set(sr_flags)
    assert sr_flags["large_size"] == 256 and sr_flags["small_size"] == 64
    assert len(sr_flags) == 22
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, flags)
    args = parser.parse_args(["--class_cond", "yes", "--num-channels", "64", "--dropout", "0.1"])
    parsed = args_to_dict(args, flags)
    assert parsed["class_cond"] is True and parsed["num_channels"] == 64
    assert parsed["dropout"] == 0.1 and parsed["use_fp16"] is False
    assert [str2bool(v) for v in ["T", "1", "No", "f", False]] == [True, True, False, False, False]
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")
