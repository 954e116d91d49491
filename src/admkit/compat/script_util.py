"""guided-diffusion's ``script_util`` API, as a thin layer over admkit's networks.

Same names, arguments, defaults and flag dicts as the original, so research code built on it
switches by changing one import. Beyond the original, and without changing what it accepts:

* ``channel_mult`` may contain fractions ("0.5,1,1,2,2,4,4") or be a tuple, and any image size
  works when it is given; sizes 8, 16 and 32 have defaults (see ``admkit.unet``);
* ``attention_resolutions`` may be "" (no attention except the middle block) or a tuple;
* every factory takes a keyword ``num_classes`` (default ``NUM_CLASSES``) for data sets that do
  not have 1000 classes; ``sr_create_model`` and ``create_classifier`` also take ``channel_mult``
  for other sizes;
* ``add_dict_to_argparser`` also registers the dashed spelling of each flag.

``model_config``, ``classifier_config`` and ``sr_model_config`` turn a flag dict into the
native configuration, for callers that keep flags as data (presets, the command line).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from admkit.unet import (
    EncoderUNet,
    EncoderUNetConfig,
    SuperResUNet,
    UNet,
    UNetConfig,
    attention_ds_from_resolutions,
    default_channel_mult,
)

NUM_CLASSES = 1000

# sr_create_model's own table: the 512 upsampler does NOT use the 0.5 first level
SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def diffusion_defaults() -> dict[str, Any]:
    """Defaults of the diffusion flags, shared by every script."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults() -> dict[str, Any]:
    """Defaults of the classifier flags."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",
        classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True,
        classifier_pool="attention",
    )


def model_and_diffusion_defaults() -> dict[str, Any]:
    """Defaults of the diffusion-model flags plus ``diffusion_defaults()``."""
    flags = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    flags.update(diffusion_defaults())
    return flags


def classifier_and_diffusion_defaults() -> dict[str, Any]:
    """``classifier_defaults()`` plus ``diffusion_defaults()``."""
    flags = classifier_defaults()
    flags.update(diffusion_defaults())
    return flags


def sr_model_and_diffusion_defaults() -> dict[str, Any]:
    """The model defaults without image_size, channel_mult and use_new_attention_order, plus
    large_size 256 and small_size 64 (so upsamplers always use the legacy attention order)."""
    flags = model_and_diffusion_defaults()
    for key in ("image_size", "channel_mult", "use_new_attention_order"):
        del flags[key]
    flags.update(large_size=256, small_size=64)
    return flags


def _ints(value: str | Iterable[int]) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(part) for part in value.split(",") if part.strip())
    return tuple(int(v) for v in value)


def _channel_mult(value: str | Iterable[float] | None, image_size: int) -> tuple[float, ...]:
    if value is None or value == "":
        return default_channel_mult(image_size)
    parts = value.split(",") if isinstance(value, str) else value
    mult = tuple(float(p) for p in parts)
    return tuple(int(m) if m == int(m) else m for m in mult)


def _unset(value: int) -> int | None:
    # guided-diffusion writes "not set" as -1
    return None if value == -1 else value


def model_config(flags: Mapping[str, Any]) -> UNetConfig:
    """The UNetConfig of ``create_model(**flags)``; ``flags`` holds every create_model argument
    (extra keys, such as the diffusion flags, are ignored)."""
    image_size = flags["image_size"]
    num_classes = flags.get("num_classes") or NUM_CLASSES
    return UNetConfig(
        image_size=image_size,
        in_channels=3,
        model_channels=flags["num_channels"],
        out_channels=6 if flags["learn_sigma"] else 3,
        num_res_blocks=flags["num_res_blocks"],
        attention_ds=attention_ds_from_resolutions(
            image_size, _ints(flags["attention_resolutions"])
        ),
        dropout=flags["dropout"],
        channel_mult=_channel_mult(flags["channel_mult"], image_size),
        num_classes=num_classes if flags["class_cond"] else None,
        use_checkpoint=flags["use_checkpoint"],
        use_fp16=flags["use_fp16"],
        num_heads=flags["num_heads"],
        num_head_channels=_unset(flags["num_head_channels"]),
        num_heads_upsample=_unset(flags["num_heads_upsample"]),
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"],
        use_new_attention_order=flags["use_new_attention_order"],
    )


def classifier_config(flags: Mapping[str, Any]) -> EncoderUNetConfig:
    """The EncoderUNetConfig of ``create_classifier(**flags)`` (classifier_defaults keys).

    Beyond the original, ``flags["channel_mult"]`` may set the trunk's multipliers (sizes without
    a default); unset or "", the table of the image size applies, as in guided-diffusion.
    """
    image_size = flags["image_size"]
    return EncoderUNetConfig(
        image_size=image_size,
        in_channels=3,
        model_channels=flags["classifier_width"],
        out_channels=flags.get("num_classes") or NUM_CLASSES,
        num_res_blocks=flags["classifier_depth"],
        attention_ds=attention_ds_from_resolutions(
            image_size, _ints(flags["classifier_attention_resolutions"])
        ),
        channel_mult=_channel_mult(flags.get("channel_mult", ""), image_size),
        use_fp16=flags["classifier_use_fp16"],
        num_head_channels=64,  # fixed in the original, not a flag
        use_scale_shift_norm=flags["classifier_use_scale_shift_norm"],
        resblock_updown=flags["classifier_resblock_updown"],
        pool=flags["classifier_pool"],
    )


def sr_model_config(flags: Mapping[str, Any]) -> UNetConfig:
    """The UNetConfig of ``sr_create_model(**flags)`` (sr_model_and_diffusion_defaults keys).

    The channel multipliers come from the upsampler's own table by ``large_size``, then from
    ``flags["channel_mult"]`` or the general table for other sizes (beyond the original, which
    supports 64, 256 and 512 only). ``small_size`` does not change the network.
    """
    large_size = flags["large_size"]
    explicit = flags.get("channel_mult", "")
    if explicit not in ("", None):
        channel_mult = _channel_mult(explicit, large_size)
    else:
        channel_mult = SR_CHANNEL_MULT.get(large_size) or default_channel_mult(large_size)
    return model_config(
        {
            **flags,
            "image_size": large_size,
            "channel_mult": channel_mult,
            "use_new_attention_order": False,
        }
    )


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    *,
    num_classes=NUM_CLASSES,
) -> UNet:
    """The diffusion UNet for guided-diffusion's flags."""
    return UNet(model_config(locals()))


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    *,
    num_classes=NUM_CLASSES,
    channel_mult="",
) -> EncoderUNet:
    """The noise-aware classifier for guided-diffusion's classifier flags."""
    return EncoderUNet(classifier_config(locals()))


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    *,
    num_classes=NUM_CLASSES,
    channel_mult="",
) -> SuperResUNet:
    """The super-resolution UNet for guided-diffusion's upsampler flags."""
    return SuperResUNet(sr_model_config(locals()))


def _diffusion(flags: Mapping[str, Any]):
    # Imported here: the diffusion half of compat lives in its own module.
    from admkit.compat.gaussian_diffusion import create_gaussian_diffusion

    return create_gaussian_diffusion(
        steps=flags["diffusion_steps"],
        learn_sigma=flags["learn_sigma"],
        noise_schedule=flags["noise_schedule"],
        use_kl=flags["use_kl"],
        predict_xstart=flags["predict_xstart"],
        rescale_timesteps=flags["rescale_timesteps"],
        rescale_learned_sigmas=flags["rescale_learned_sigmas"],
        timestep_respacing=flags["timestep_respacing"],
    )


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    *,
    num_classes=NUM_CLASSES,
):
    """``(create_model(...), create_gaussian_diffusion(...))`` for the full flag set."""
    flags = locals()
    return UNet(model_config(flags)), _diffusion(flags)


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    *,
    num_classes=NUM_CLASSES,
    channel_mult="",
):
    """``(create_classifier(...), create_gaussian_diffusion(...))``."""
    flags = locals()
    return EncoderUNet(classifier_config(flags)), _diffusion(flags)


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    *,
    num_classes=NUM_CLASSES,
    channel_mult="",
):
    """``(sr_create_model(...), create_gaussian_diffusion(...))``."""
    flags = locals()
    return SuperResUNet(sr_model_config(flags)), _diffusion(flags)


def str2bool(value: str | bool) -> bool:
    """yes/true/t/y/1 → True, no/false/f/n/0 → False (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("boolean value expected")


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Mapping[str, Any]) -> None:
    """Add ``--key`` (and ``--key-with-dashes``) for every entry, typed by its default value:
    None → str, bool → str2bool, otherwise the default's type."""
    for key, value in default_dict.items():
        if value is None:
            value_type = str
        elif isinstance(value, bool):
            value_type = str2bool
        else:
            value_type = type(value)
        spellings = [f"--{key}"]
        if "_" in key:
            spellings.append(f"--{key.replace('_', '-')}")
        parser.add_argument(*spellings, default=value, type=value_type)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """``{key: args.key}`` for the given keys."""
    return {key: getattr(args, key) for key in keys}
