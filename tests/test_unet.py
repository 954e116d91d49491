"""The native networks on tiny configurations: checkpointing, fp16, sizes, labels, layouts."""

import contextlib
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from admkit.compilation import inductor_options
from admkit.errors import UserError
from admkit.unet import (
    EncoderUNet,
    EncoderUNetConfig,
    SuperResUNet,
    UNet,
    UNetConfig,
    default_channel_mult,
)

TINY = dict(
    image_size=16,
    model_channels=32,
    num_res_blocks=1,
    channel_mult=(1, 2),
    attention_ds=(1, 2),
    num_head_channels=16,
)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-zero values, so zero-initialised layers do not hide anything."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator) + (p.ndim == 1) * 1.0)
    return model


def tiny_unet(**changes) -> UNet:
    torch.manual_seed(0)
    config = UNetConfig(**{**TINY, "num_classes": 3, "resblock_updown": True, **changes})
    return randomised(UNet(config).eval())


def inputs(size: int = 16, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    return x, torch.tensor([3, 700])[:batch], torch.tensor([0, 2])[:batch]


def gradients(model: UNet, double: bool):
    x, t, y = inputs()
    x.requires_grad_(True)
    model.zero_grad()
    # The fused CPU attention kernel has no second derivative; the math kernel has. Checkpointed
    # blocks recompute inside backward, so the whole computation runs under the choice.
    with sdpa_kernel(SDPBackend.MATH) if double else contextlib.nullcontext():
        out = model(x, t, y)
        loss = out.square().mean()
        if double:  # a gradient penalty: backward through a gradient
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            loss = g.square().sum()
        loss.backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("double", [False, True])
def test_checkpointing_gives_the_same_gradients(double):
    plain = gradients(tiny_unet(dropout=0.0), double)
    checkpointed_model = tiny_unet(use_checkpoint=True)
    assert checkpointed_model.input_blocks[1][1].use_checkpoint  # attention honours the flag
    checkpointed = gradients(checkpointed_model, double)
    torch.testing.assert_close(checkpointed[0], plain[0])
    torch.testing.assert_close(checkpointed[1], plain[1])
    assert plain[2].keys() == checkpointed[2].keys()
    for name, grad in plain[2].items():
        torch.testing.assert_close(checkpointed[2][name], grad, msg=name)
    assert plain[1].abs().sum() > 0


def test_convert_to_fp16_converts_only_convolutions():
    model = tiny_unet()
    x, t, y = inputs()
    with torch.no_grad():
        reference = model(x, t, y)
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    half = [
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.2.weight",
        "input_blocks.1.0.out_layers.3.bias",
        "input_blocks.3.1.qkv.weight",
        "middle_block.1.proj_out.weight",
        "output_blocks.0.0.skip_connection.weight",
    ]
    single = [
        "time_embed.0.weight",
        "label_emb.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "middle_block.1.norm.weight",
        "out.0.weight",
        "out.2.weight",
    ]
    assert all(dtypes[n] == torch.float16 for n in half), dtypes
    assert all(dtypes[n] == torch.float32 for n in single), dtypes
    with torch.no_grad():
        out = model(x, t, y)
    assert out.dtype == torch.float32
    assert ((out - reference).norm() / reference.norm()) < 1e-2
    model.convert_to_fp16(torch.bfloat16)
    with torch.no_grad():
        out = model(x, t, y)
    assert ((out - reference).norm() / reference.norm()) < 5e-2
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(x, t, y)
    assert ((out - reference).norm() / reference.norm()) < 5e-2  # bfloat16-rounded weights


def test_classifier_fp16_keeps_its_head_in_float32():
    config = EncoderUNetConfig(**TINY, out_channels=5, pool="attention")
    model = randomised(EncoderUNet(config).eval())
    x, t, _ = inputs()
    with torch.no_grad():
        reference = model(x, t)
        model.convert_to_fp16()
        out = model(x, t)
    assert model.out[2].qkv_proj.weight.dtype == torch.float32
    assert model.middle_block[1].qkv.weight.dtype == torch.float16
    assert out.dtype == torch.float32
    assert ((out - reference).norm() / reference.norm()) < 1e-2


def test_sizes_beyond_the_default_table():
    # 24 = 3 x 8: not a power of two, fine with an explicit channel_mult
    model = tiny_unet(image_size=24, channel_mult=(1, 1, 2, 2), attention_ds=(2, 8))
    x, t, y = inputs(24)
    assert model(x, t, y).shape == (2, 3, 24, 24)
    config = EncoderUNetConfig(**{**TINY, "image_size": 24, "channel_mult": (1, 1, 2, 2)})
    classifier = EncoderUNet(config)
    assert classifier.out[2].positional_embedding.shape == (64, 3 * 3 + 1)
    assert classifier(x, t).shape == (2, 1000)
    assert default_channel_mult(32) == (1, 2, 2, 2)
    with pytest.raises(UserError, match="image size 40"):
        default_channel_mult(40)
    with pytest.raises(UserError, match="image size 20 is not divisible by 8"):
        UNetConfig(**{**TINY, "image_size": 20, "channel_mult": (1, 1, 2, 2)})
    with pytest.raises(UserError, match="divisible by 8"):
        model(torch.randn(1, 3, 18, 18), t[:1], y[:1])


def test_labels_are_required_exactly_for_conditional_models():
    x, t, y = inputs()
    with pytest.raises(UserError, match="needs class labels"):
        tiny_unet()(x, t)
    with pytest.raises(UserError, match="unconditional"):
        tiny_unet(num_classes=None)(x, t, y)
    with pytest.raises(UserError, match="num_classes"):
        UNetConfig(**TINY, num_classes=0)


def test_labels_and_timesteps_change_the_output():
    model = tiny_unet()
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y)
        assert not torch.allclose(model(x, t, torch.tensor([1, 1])), out)
        assert not torch.allclose(model(x, t + 1, y), out)
        # a scalar timestep stands for the whole batch; float timesteps are accepted
        torch.testing.assert_close(model(x, 7, y), model(x, torch.tensor([7, 7]), y))
        torch.testing.assert_close(model(x, t.float(), y), out)


def test_channels_last_gives_the_same_output():
    model = tiny_unet(resblock_updown=False)
    x, t, y = inputs()
    with torch.no_grad():
        expected = model(x, t, y)
        out = model(x.to(memory_format=torch.channels_last), t, y)
        channels_last_model = model.to(memory_format=torch.channels_last)
        out_both = channels_last_model(x.to(memory_format=torch.channels_last), t, y)
    # convolution kernels for the two layouts sum in different orders
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_both, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "pool, head_keys",
    [
        ("adaptive", {"out.0.weight", "out.0.bias", "out.3.weight", "out.3.bias"}),
        ("spatial", {"out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"}),
        ("spatial_v2", {f"out.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}),
    ],
)
def test_classifier_pools(pool, head_keys):
    config = EncoderUNetConfig(**TINY, out_channels=7, pool=pool)
    model = EncoderUNet(config).eval()
    assert {key for key in model.state_dict() if key.startswith("out.")} == head_keys
    x, t, _ = inputs()
    fresh = model(x, t)
    assert fresh.shape == (2, 7)
    if pool == "adaptive":  # zero-initialised 1x1 conv
        assert torch.equal(fresh, torch.zeros_like(fresh))
    if pool.startswith("spatial"):
        # means of every input block's output (32+32+32+64) and of the middle (64)
        assert model.out[0].in_features == 224
    with torch.no_grad():
        expected = randomised(model)(x, t)
        out = model(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_super_res_unet_conditions_on_the_upsampled_low_res():
    config = UNetConfig(**TINY, out_channels=6)
    model = randomised(SuperResUNet(config).eval())
    assert model.input_blocks[0][0].weight.shape[1] == 6
    x, t, _ = inputs()
    low_res = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, t, low_res=low_res)
        assert out.shape == (2, 6, 16, 16)
        assert not torch.allclose(model(x, t, low_res=low_res.flip(-1)), out)
    with pytest.raises(UserError, match="low_res"):
        model(x, t)


def test_config_is_frozen_and_normalised():
    config = UNetConfig(**{**TINY, "channel_mult": [1, 2], "attention_ds": [2]})
    assert config.channel_mult == (1, 2) and config.attention_ds == (2,)
    assert UNetConfig(image_size=64).channel_mult == (1, 2, 3, 4)
    assert UNetConfig(**TINY, num_heads_upsample=-1).num_heads_upsample is None
    round_trip = UNetConfig(**dataclasses.asdict(config))
    assert round_trip == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.image_size = 32
    with pytest.raises(UserError, match="pool"):
        EncoderUNetConfig(**TINY, pool="max")
    with pytest.raises(UserError, match="num_head_channels"):
        UNetConfig(**{**TINY, "num_head_channels": 24})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_groupnorm_of_half_inputs_equals_the_float32_computation(dtype):
    # The original upcasts to float32, normalises, and casts back; admkit's CPU path hands the
    # half tensor to the kernel directly and must give the same numbers up to the last rounding
    # (a few elements in 16,384 differ by one unit in the last place).
    from admkit.nn import normalization

    norm = normalization(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (3 * torch.randn(4, 64, 8, 8, generator=torch.Generator().manual_seed(0)) + 5).to(dtype)
    out = norm(x)
    expected = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, norm.eps)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype))  # the dtype's default: about 1 ulp
    assert (out != expected.to(dtype)).float().mean() < 1e-3


@pytest.mark.parametrize("size", [(5, 7), (4, 4)])
def test_upsample_conv_is_the_convolution_of_the_upsampled_map(size):
    # The transposed convolution must be the same linear map as the textbook form, whose input
    # it never builds: outputs and gradients (input, weight, bias) in float64, and a second
    # derivative.
    from admkit.nn import upsample_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)

    def textbook(x):
        up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return conv(up)

    out, expected = upsample_conv(x, conv), textbook(x)
    assert out.shape == (2, 4, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, conv.weight, conv.bias])
    expected_grads = torch.autograd.grad((expected * probe).sum(), [x, conv.weight, conv.bias])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda x: upsample_conv(x, conv), (x,))


def test_upsample_conv_of_a_half_model_rounds_its_kernels_once():
    from admkit.nn import upsample_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 6, 6)
    expected = upsample_conv(x.double(), conv.double())
    half = upsample_conv(x.bfloat16(), conv.bfloat16())
    # bf16 inputs, weights folded in float32: within a few bf16 units of the exact result.
    error = (half.double() - expected).abs().max() / expected.abs().max()
    assert half.dtype == torch.bfloat16 and error < 4 * torch.finfo(torch.bfloat16).eps


def test_compiled_network_gives_the_eager_gradients():
    # `--compile True` training runs the network through torch.compile with admkit's Inductor
    # options (and a compile-only form of the skip path's upsampling): its gradients must be
    # eager's. (Inductor compiled an as_strided form of the upsampling, tried as a faster
    # interleave, to gradients wrong by 4 % of their scale on this model.)
    model = tiny_unet(attention_ds=(2,))
    model.train()
    _, _, eager = gradients(model, double=False)
    # Static shapes, as in training. Without the reset, shapes that other tests compiled earlier
    # in the process turn on dynamic shapes, for which torch 2.13's Inductor fails to compile
    # this network's backward.
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False, options=inductor_options(torch.device("cpu")))
    x, t, y = inputs()
    model.zero_grad()
    compiled(x, t, y).square().mean().backward()
    scale = max(g.abs().max() for g in eager.values())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, eager[name], rtol=1e-4, atol=1e-4 * scale)


def test_modulated_groupnorm_is_adaptive_group_norm():
    # One GroupNorm over the batch folded into the channels must be GN(x)·(1 + s) + b per
    # example (AdaGN, paper §3.1): outputs and gradients against the textbook form in float64.
    from admkit.nn import normalization

    torch.manual_seed(0)
    norm = normalization(64).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (3 * torch.randn(3, 64, 5, 4, dtype=torch.float64) + 2).requires_grad_(True)
    scale = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    out = norm.modulated(x, scale, shift)
    expected = norm(x) * (1 + scale[..., None, None]) + shift[..., None, None]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    probe = torch.randn_like(out)
    inputs = [x, scale, shift, norm.weight, norm.bias]
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * probe).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)
