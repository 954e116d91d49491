"""Weights files a user points at: released guided-diffusion ``.pt`` state dicts,
``.safetensors`` files, and a run's checkpoints, read without running code from the file and
checked key by key against the network they are for."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors.torch
import torch

from admkit.checkpoint import checkpoint_weights, is_checkpoint_folder, run_weights
from admkit.errors import UserError


def read_state_dict(path: str | os.PathLike, weights: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pt`` file, a ``.safetensors`` file, a run directory (its newest
    checkpoint) or one of a run's checkpoint folders.

    ``.pt`` files are read with ``weights_only=True``: one that holds Python objects (which could
    run code when unpickled) is refused with a :class:`UserError`. ``weights`` picks the weights
    of a run directory or checkpoint folder (see :func:`checkpoint_weights`).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        if is_checkpoint_folder(path):
            return checkpoint_weights(path, weights)
        return run_weights(path, weights)
    if weights is not None:
        raise UserError(
            f"{path} is one weights file; choosing weights {weights!r} needs a run directory "
            "or one of its checkpoint folders"
        )
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path)
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise UserError(f"cannot read {path}: damaged safetensors file ({error})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch words every weights-only failure alike. A refused object names its GLOBAL; a
        # plain pickle (PROTO opcode 0x80, protocol 2-5, not torch.save's zip) may stop earlier,
        # at an opcode the safe unpickler lacks, and may hold anything.
        with open(path, "rb") as file:
            head = file.read(2)
        plain_pickle = len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
        if "global" in str(error).lower() or plain_pickle:
            raise UserError(
                f"{path} holds Python objects besides tensors, and loading them could run code, "
                "so admkit refuses it; re-save it as a plain state dict or a .safetensors file"
            ) from None
        raise UserError(f"cannot read {path}: not a PyTorch checkpoint (damaged?)") from None
    except Exception as error:  # torch.load raises many types for truncated or foreign files
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read {path}: not a complete checkpoint ({first_line})") from None
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise UserError(f"{path} is not a state dict (a mapping from names to tensors)")
    return dict(loaded)


def _first(items: list[str], count: int = 3) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    model: torch.nn.Module,
    source: str,
    suggest_preset: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None,
) -> None:
    """Raise a :class:`UserError` naming the keys and shapes where a state dict and a model differ.

    ``suggest_preset`` (given the state dict) may name a preset whose model fits it, for the
    message to recommend.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {list(state_dict[key].shape)} vs model {list(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_first(mismatched)}")
    preset = suggest_preset(state_dict) if suggest_preset is not None else None
    if preset:
        advice = f"it fits preset {preset!r}: use --preset {preset}"
    else:
        advice = "pass the model options it was trained with"
    raise UserError(f"{source} does not match the model options ({'; '.join(problems)}); {advice}")


def load_released_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    suggest_preset: Callable[[Mapping[str, torch.Tensor]], str | None] | None = None,
) -> None:
    """Load a guided-diffusion ``.pt`` state dict (or a ``.safetensors`` file) into ``model``.

    Keys and shapes must match exactly; otherwise a :class:`UserError` names the differences (and
    a preset that fits, when ``suggest_preset`` finds one).
    """
    state_dict = read_state_dict(path)
    check_state_dict(state_dict, model, str(path), suggest_preset)
    model.load_state_dict(state_dict)
