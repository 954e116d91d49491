"""Build networks and diffusions from flags, and resolve the ``--model`` / ``--classifier``
arguments of the sampling commands (a run directory, a ``.safetensors`` file or a released
guided-diffusion ``.pt``).

A run directory's ``config.json`` holds, besides training options::

    kind            "diffusion" | "classifier" | "upsampler"
    flags           guided-diffusion's flag dict for that kind, plus "num_classes" (rows of the
                    label embedding / classifier outputs)
    num_classes     number of real classes (labels 0..K-1), or null for an unconditional model
    cfg_null_label  label index of "no class" when trained with --cfg_dropout (= K), else null
    class_names     the data's class names, when known
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from admkit.checkpoint import config_dir, read_config
from admkit.cli.options import preset_flags, resolve_flags
from admkit.compat import script_util
from admkit.diffusion import Diffusion, DiffusionConfig
from admkit.errors import UserError
from admkit.presets import find_matching_preset
from admkit.unet import EncoderUNet, SuperResUNet, UNet
from admkit.weights import check_state_dict, read_state_dict

FLAG_GROUP = {"diffusion": "model", "classifier": "classifier", "upsampler": "upsampler"}
KIND_NAME = {
    "diffusion": "a diffusion model",
    "classifier": "a classifier",
    "upsampler": "an upsampler",
}


def build_network(kind: str, flags: Mapping[str, Any]) -> torch.nn.Module:
    """The network of ``kind`` for a full flag dict (``num_classes`` defaults to 1000)."""
    if kind == "diffusion":
        return UNet(script_util.model_config(flags))
    if kind == "classifier":
        return EncoderUNet(script_util.classifier_config(flags))
    if kind == "upsampler":
        return SuperResUNet(script_util.sr_model_config(flags))
    raise ValueError(f"unknown model kind {kind!r}")


def build_diffusion(flags: Mapping[str, Any], timestep_respacing: str | None = None) -> Diffusion:
    """The native diffusion of a flag dict; ``timestep_respacing`` overrides the flags' value."""
    respacing = (
        flags.get("timestep_respacing", "") if timestep_respacing is None else timestep_respacing
    )
    return Diffusion.from_config(
        DiffusionConfig(
            diffusion_steps=flags["diffusion_steps"],
            noise_schedule=flags["noise_schedule"],
            timestep_respacing=respacing,
            learn_sigma=flags["learn_sigma"],
            predict_xstart=flags["predict_xstart"],
            use_kl=flags["use_kl"],
            rescale_learned_sigmas=flags["rescale_learned_sigmas"],
            rescale_timesteps=flags["rescale_timesteps"],
        )
    )


@dataclass
class LoadedModel:
    """A network with its weights loaded, and what the sampling commands need to know of it."""

    kind: str
    network: torch.nn.Module
    flags: dict[str, Any]
    num_classes: int | None  # real classes; None for an unconditional model
    cfg_null_label: int | None  # label index meaning "no class", for classifier-free guidance
    source: str
    class_names: list[str] | None = None  # the training data's, where the run recorded them


def _suggest(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    return find_matching_preset({k: tuple(v.shape) for k, v in state_dict.items()})


def load_model(
    spec: str | os.PathLike,
    kind: str,
    args: argparse.Namespace | None = None,
    *,
    weights: str | None = None,
    preset: str | None = None,
) -> LoadedModel:
    """Load ``spec`` as a model of ``kind``.

    * a run directory: flags from its ``config.json``, weights from its newest checkpoint
      (``weights`` picks ``model`` or ``ema_RATE``; default the first EMA);
    * one of a run's checkpoint folders (``RUN/checkpoints/step_N``), or a ``.safetensors`` file
      in one: flags from the run's ``config.json``, weights from that checkpoint;
    * a ``.safetensors`` file with a ``config.json`` beside it, or any ``.safetensors`` / ``.pt``
      state dict with the model options in ``args`` and/or ``preset`` (guided-diffusion's
      released checkpoints: ``--preset imagenet64``...).
    Keys and shapes are checked strictly; a mismatch names the differences and a preset that fits.
    """
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"model {spec} does not exist; give a run directory, a checkpoint folder, "
            ".safetensors or .pt"
        )
    group = FLAG_GROUP[kind]
    run_config = config_dir(path)
    if run_config is not None:
        config = _read_run_config(run_config, spec, kind)
        flags = dict(config["flags"])
        num_classes = config.get("num_classes")
        cfg_null_label = config.get("cfg_null_label")
        class_names = config.get("class_names")
    else:
        base = preset_flags(preset, kind) if preset else None
        flags = resolve_flags(args, group, base) if args is not None else dict(base or {})
        if not flags:
            raise UserError(f"{spec}: pass --preset or the model options it was trained with")
        flags.setdefault("num_classes", script_util.NUM_CLASSES)
        conditional = kind == "classifier" or flags.get("class_cond", False)
        num_classes = flags["num_classes"] if conditional else None
        cfg_null_label = None
        class_names = None
    state_dict = read_state_dict(path, weights)
    network = build_network(kind, flags)
    check_state_dict(state_dict, network, str(spec), _suggest)
    network.load_state_dict(state_dict)
    # Released flags may say use_fp16; precision is chosen at sampling time (--precision) instead.
    return LoadedModel(
        kind, network.eval(), flags, num_classes, cfg_null_label, str(spec), class_names
    )


def load_initial_weights(network: torch.nn.Module, spec: str | os.PathLike, kind: str) -> None:
    """Start ``network`` (a ``kind`` built from a training command's options) from the weights
    at ``spec``, for fine-tuning: a run directory (its newest checkpoint's first EMA), one of a
    run's checkpoint folders or a weights file in one, a ``.safetensors`` or a released ``.pt``.
    Keys and shapes must match the network's exactly, as when sampling."""
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"--init_from {spec} does not exist; give a run directory, a checkpoint folder, "
            ".safetensors or .pt"
        )
    run_config = config_dir(path)
    if run_config is not None:
        _read_run_config(run_config, spec, kind)
    state_dict = read_state_dict(path)
    check_state_dict(state_dict, network, str(spec), _suggest)
    network.load_state_dict(state_dict)


def _read_run_config(run_dir: Path, spec: str | os.PathLike, kind: str) -> dict[str, Any]:
    config = read_config(run_dir)
    if config.get("kind") != kind:
        found = KIND_NAME.get(config.get("kind"), f"{config.get('kind')} model")
        raise UserError(f"{spec} holds {found}; {KIND_NAME[kind]} is needed here")
    return config
