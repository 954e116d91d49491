"""Options shared by every command that builds a model (SPEC §2.1).

The options carry guided-diffusion's flag names and types, so a ``MODEL_FLAGS`` string copied
from its README works as is; each is registered with underscores and with dashes. Every option
defaults to "not given" so that ``--preset`` can fill in what the user left out:
the value used is the user's, else the preset's, else guided-diffusion's default.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from admkit.compat import script_util
from admkit.errors import UserError


def _upsampler_defaults() -> dict[str, Any]:
    # Beyond the original, an upsampler's channel_mult may be given (sizes without a default,
    # or a checkpoint trained with another one); "" keeps guided-diffusion's table.
    return {**script_util.sr_model_and_diffusion_defaults(), "channel_mult": ""}


def _classifier_defaults() -> dict[str, Any]:
    # Beyond the original, a classifier's channel_mult may be given too (sizes without a
    # default); "" keeps the table of the image size.
    return {**script_util.classifier_and_diffusion_defaults(), "channel_mult": ""}


# groups of flags, each with guided-diffusion's defaults
FLAG_GROUPS = {
    "model": script_util.model_and_diffusion_defaults,
    "classifier": _classifier_defaults,
    "upsampler": _upsampler_defaults,
}


def spellings(name: str) -> list[str]:
    """``--a_b`` and ``--a-b`` for an option named ``a_b``."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    return names


def _flag_type(default: Any):
    if isinstance(default, bool):
        return script_util.str2bool
    if default is None:
        return str
    return type(default)


def add_model_options(parser: argparse.ArgumentParser, *groups: str) -> None:
    """Register the flags of the named groups (``model``, ``classifier``, ``upsampler``),
    ``--preset`` and ``--num_classes``; a flag shared by two groups is registered once."""
    group = parser.add_argument_group("model and diffusion options (guided-diffusion names)")
    group.add_argument(
        *spellings("preset"),
        default=None,
        help="a released configuration (see `admkit presets`); later options override it",
    )
    group.add_argument(
        *spellings("num_classes"),
        type=int,
        default=None,
        help="number of classes (default: from the data when training, 1000 with a preset)",
    )
    seen = set()
    for name in groups:
        for key, default in FLAG_GROUPS[name]().items():
            if key in seen:
                continue
            seen.add(key)
            group.add_argument(
                *spellings(key),
                type=_flag_type(default),
                default=None,
                metavar=type(default).__name__.upper() if default is not None else "STR",
                help=f"default: {default!r}",
            )


def preset_flags(name: str, kind: str) -> dict[str, Any]:
    """The flags of preset ``name``, which must be of ``kind`` (diffusion/classifier/upsampler)."""
    from admkit.presets import get_preset

    preset = get_preset(name)
    if preset.kind != kind:
        raise UserError(f"preset {name!r} is a {preset.kind} preset; this needs a {kind} preset")
    return dict(preset.flags)


def resolve_flags(
    args: argparse.Namespace, group: str, base: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The full flag dict of ``group``: guided-diffusion's defaults, updated by ``base`` (a
    preset's or a run directory's flags), then by every option the user gave."""
    flags = FLAG_GROUPS[group]()
    if base:
        flags.update({k: v for k, v in base.items() if k in flags or k == "num_classes"})
    for key in list(flags):
        value = getattr(args, key, None)
        if value is not None:
            flags[key] = value
    if getattr(args, "num_classes", None) is not None:
        flags["num_classes"] = args.num_classes
    return flags
