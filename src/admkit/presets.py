"""The released guided-diffusion configurations as named, frozen presets (SPEC §4).

Each preset keeps the flags published next to its checkpoint in guided-diffusion's README
(``published``), the full flag set those imply (``flags``: the compat defaults updated with the
published flags, exactly what the original scripts would see), the released file name, and its
default sampling settings (respacing, matching classifier, guidance scale from the README).

    >>> get_preset("imagenet128").classifier_scale
    0.5
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from admkit.errors import UserError

KINDS = ("diffusion", "upsampler", "classifier")


@dataclass(frozen=True)
class Preset:
    """One released configuration.

    Attributes:
        name: preset name, e.g. "imagenet256".
        kind: "diffusion", "upsampler" or "classifier".
        description: one line for listings.
        checkpoint: file name of the released weights (openaipublic ``diffusion/jul-2021/``).
        published: the flags published with the checkpoint, verbatim.
        flags: the full guided-diffusion flag set (defaults updated with ``published``).
        timestep_respacing: default sampling steps ("250", "1000"); None for classifiers.
        classifier: the preset of the classifier that guides this model, if any.
        classifier_scale: the README's guidance scale with that classifier, if any.
    """

    name: str
    kind: str
    description: str
    checkpoint: str
    published: Mapping[str, Any]
    flags: Mapping[str, Any]
    timestep_respacing: str | None = None
    classifier: str | None = None
    classifier_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Everything about the preset as plain JSON-ready data."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "checkpoint": self.checkpoint,
            "timestep_respacing": self.timestep_respacing,
            "classifier": self.classifier,
            "classifier_scale": self.classifier_scale,
            "published": dict(self.published),
            "flags": dict(self.flags),
        }


def _defaults(kind: str) -> dict[str, Any]:
    # The compat module owns guided-diffusion's default dicts; imported here so listing presets
    # does not pull in the networks.
    from admkit.compat import script_util

    return {
        "diffusion": script_util.model_and_diffusion_defaults,
        "upsampler": script_util.sr_model_and_diffusion_defaults,
        "classifier": script_util.classifier_and_diffusion_defaults,
    }[kind]()


# flags shared by the ImageNet 256/512 and LSUN diffusion models (README MODEL_FLAGS)
_ADM_256 = dict(
    attention_resolutions="32,16,8",
    class_cond=True,
    diffusion_steps=1000,
    image_size=256,
    learn_sigma=True,
    noise_schedule="linear",
    num_channels=256,
    num_head_channels=64,
    num_res_blocks=2,
    resblock_updown=True,
    use_fp16=True,
    use_scale_shift_norm=True,
)
_LSUN = {**_ADM_256, "class_cond": False, "dropout": 0.1}
_UPSAMPLER = dict(
    class_cond=True,
    diffusion_steps=1000,
    learn_sigma=True,
    noise_schedule="linear",
    num_channels=192,
    num_res_blocks=2,
    resblock_updown=True,
    use_fp16=True,
    use_scale_shift_norm=True,
)


def _classifier_flags(image_size: int, depth: int, noise_schedule: str) -> dict[str, Any]:
    # The released classifiers share everything but size and depth; the schedule is the one of
    # the model they guide (the classifier itself has none; t is passed in).
    return dict(
        image_size=image_size,
        classifier_attention_resolutions="32,16,8",
        classifier_depth=depth,
        classifier_width=128,
        classifier_pool="attention",
        classifier_resblock_updown=True,
        classifier_use_scale_shift_norm=True,
        diffusion_steps=1000,
        noise_schedule=noise_schedule,
    )


# name -> (kind, description, checkpoint, published flags, sampling defaults)
_TABLE: dict[str, tuple[str, str, str, dict[str, Any], dict[str, Any]]] = {
    "imagenet64": (
        "diffusion",
        "ImageNet 64x64 class-conditional ADM (296M parameters, cosine schedule)",
        "64x64_diffusion.pt",
        dict(
            attention_resolutions="32,16,8",
            class_cond=True,
            diffusion_steps=1000,
            dropout=0.1,
            image_size=64,
            learn_sigma=True,
            noise_schedule="cosine",
            num_channels=192,
            num_head_channels=64,
            num_res_blocks=3,
            resblock_updown=True,
            use_new_attention_order=True,
            use_fp16=True,
            use_scale_shift_norm=True,
        ),
        dict(timestep_respacing="250", classifier="classifier64", classifier_scale=1.0),
    ),
    "imagenet128": (
        "diffusion",
        "ImageNet 128x128 class-conditional ADM (422M parameters)",
        "128x128_diffusion.pt",
        dict(
            attention_resolutions="32,16,8",
            class_cond=True,
            diffusion_steps=1000,
            image_size=128,
            learn_sigma=True,
            noise_schedule="linear",
            num_channels=256,
            num_heads=4,
            num_res_blocks=2,
            resblock_updown=True,
            use_fp16=True,
            use_scale_shift_norm=True,
        ),
        dict(timestep_respacing="250", classifier="classifier128", classifier_scale=0.5),
    ),
    "imagenet256": (
        "diffusion",
        "ImageNet 256x256 class-conditional ADM (554M parameters)",
        "256x256_diffusion.pt",
        _ADM_256,
        dict(timestep_respacing="250", classifier="classifier256", classifier_scale=1.0),
    ),
    "imagenet256-uncond": (
        "diffusion",
        "ImageNet 256x256 unconditional ADM, for classifier guidance (553M parameters)",
        "256x256_diffusion_uncond.pt",
        {**_ADM_256, "class_cond": False},
        dict(timestep_respacing="250", classifier="classifier256", classifier_scale=10.0),
    ),
    "imagenet512": (
        "diffusion",
        "ImageNet 512x512 class-conditional ADM (559M parameters)",
        "512x512_diffusion.pt",
        {**_ADM_256, "image_size": 512, "use_fp16": False},
        dict(timestep_respacing="250", classifier="classifier512", classifier_scale=4.0),
    ),
    "upsampler-64-256": (
        "upsampler",
        "ImageNet 64->256 class-conditional upsampler (312M parameters)",
        "64_256_upsampler.pt",
        dict(
            _UPSAMPLER,
            attention_resolutions="32,16,8",
            large_size=256,
            small_size=64,
            num_heads=4,
        ),
        dict(timestep_respacing="250"),
    ),
    "upsampler-128-512": (
        "upsampler",
        "ImageNet 128->512 class-conditional upsampler (309M parameters)",
        "128_512_upsampler.pt",
        dict(
            _UPSAMPLER,
            attention_resolutions="32,16",
            large_size=512,
            small_size=128,
            num_head_channels=64,
        ),
        dict(timestep_respacing="250"),
    ),
    "lsun-bedroom": (
        "diffusion",
        "LSUN bedroom 256x256 unconditional ADM (dropout 0.1)",
        "lsun_bedroom.pt",
        _LSUN,
        dict(timestep_respacing="1000"),
    ),
    "lsun-cat": (
        "diffusion",
        "LSUN cat 256x256 unconditional ADM (dropout 0.1)",
        "lsun_cat.pt",
        _LSUN,
        dict(timestep_respacing="1000"),
    ),
    "lsun-horse": (
        "diffusion",
        "LSUN horse 256x256 unconditional ADM (dropout 0.1)",
        "lsun_horse.pt",
        _LSUN,
        dict(timestep_respacing="1000"),
    ),
    "lsun-horse-nodropout": (
        "diffusion",
        "LSUN horse 256x256 unconditional ADM trained without dropout",
        "lsun_horse_nodropout.pt",
        {**_LSUN, "dropout": 0.0},
        dict(timestep_respacing="1000"),
    ),
    "classifier64": (
        "classifier",
        "noise-aware ImageNet 64x64 classifier (depth 4), guides imagenet64",
        "64x64_classifier.pt",
        _classifier_flags(64, 4, "cosine"),
        {},
    ),
    "classifier128": (
        "classifier",
        "noise-aware ImageNet 128x128 classifier, guides imagenet128",
        "128x128_classifier.pt",
        _classifier_flags(128, 2, "linear"),
        {},
    ),
    "classifier256": (
        "classifier",
        "noise-aware ImageNet 256x256 classifier, guides imagenet256 and imagenet256-uncond",
        "256x256_classifier.pt",
        _classifier_flags(256, 2, "linear"),
        {},
    ),
    "classifier512": (
        "classifier",
        "noise-aware ImageNet 512x512 classifier, guides imagenet512",
        "512x512_classifier.pt",
        _classifier_flags(512, 2, "linear"),
        {},
    ),
}


@functools.cache
def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises a UserError listing the names."""
    if name not in _TABLE:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(_TABLE)}")
    kind, description, checkpoint, published, sampling = _TABLE[name]
    flags = _defaults(kind)
    unknown = set(published) - set(flags)
    if unknown:
        raise ValueError(f"preset {name} publishes flags its defaults lack: {sorted(unknown)}")
    flags.update(published)
    return Preset(
        name=name,
        kind=kind,
        description=description,
        checkpoint=checkpoint,
        published=MappingProxyType(dict(published)),
        flags=MappingProxyType(flags),
        **sampling,
    )


def list_presets() -> list[str]:
    """The preset names, diffusion models first, then upsamplers, then classifiers."""
    return sorted(_TABLE, key=lambda name: KINDS.index(_TABLE[name][0]))


def model_config(preset: str | Preset):
    """The native network configuration (UNetConfig or EncoderUNetConfig) of a preset."""
    from admkit.compat import script_util

    preset = get_preset(preset) if isinstance(preset, str) else preset
    builder = {
        "diffusion": script_util.model_config,
        "upsampler": script_util.sr_model_config,
        "classifier": script_util.classifier_config,
    }[preset.kind]
    return builder(preset.flags)


def build_model(preset: str | Preset, device: torch.device | str | None = None) -> nn.Module:
    """A freshly initialised network of the preset (UNet, SuperResUNet or EncoderUNet).

    ``device="meta"`` builds it without allocating memory (shapes only).
    """
    from admkit.unet import EncoderUNet, SuperResUNet, UNet

    preset = get_preset(preset) if isinstance(preset, str) else preset
    network = {"diffusion": UNet, "upsampler": SuperResUNet, "classifier": EncoderUNet}
    with torch.device(device or "cpu"):
        return network[preset.kind](model_config(preset))


@functools.cache
def preset_shapes(name: str) -> Mapping[str, tuple[int, ...]]:
    """State-dict keys and shapes of a preset's network (built on the meta device, so free)."""
    model = build_model(name, device="meta")
    return MappingProxyType({key: tuple(v.shape) for key, v in model.state_dict().items()})


def _as_shapes(state_dict_shapes: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {
        key: tuple(value.shape) if hasattr(value, "shape") else tuple(value)
        for key, value in state_dict_shapes.items()
    }


def matching_presets(state_dict_shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> list[str]:
    """Every preset whose network has exactly these keys and shapes (several presets share one
    network: imagenet256-uncond and the LSUN models, for instance)."""
    shapes = _as_shapes(state_dict_shapes)
    return [name for name in list_presets() if dict(preset_shapes(name)) == shapes]


def find_matching_preset(
    state_dict_shapes: Mapping[str, Sequence[int] | torch.Tensor],
) -> str | None:
    """The first preset whose network has exactly these keys and shapes, or None.

    Args:
        state_dict_shapes: key -> shape, or a state dict itself (tensors stand for their shapes).
    """
    matches = matching_presets(state_dict_shapes)
    return matches[0] if matches else None
