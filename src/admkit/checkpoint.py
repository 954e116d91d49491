"""Run directories and atomic checkpoints (weights files from elsewhere: :mod:`admkit.weights`).

A run directory (SPEC §2.2)::

    RUN/
      config.json            what rebuilds model and diffusion, plus the training options
      log.jsonl              one JSON object per log interval (written by admkit.train)
      loss.png               the loss curve, redrawn at each save
      metrics.png            with --sample_every and a scorer: the metrics against the step
      samples/               with --sample_every: step_000500.png, a grid from the same noise
                             every time (admkit.monitor)
      judge.pt               the digits judge that scores a run on the built-in digits
      checkpoints/
        step_000500/         one complete checkpoint, named by the number of optimizer steps done
          model.safetensors
          ema_0.9999.safetensors
          state.pt           training state, tensors and plain values only (torch.save)
          manifest.json      written last: the step and the name and size of every file above
          phema_0.04.safetensors   written later by ``admkit ema``: not in the manifest
      snapshots/             with --phema: the tracked power-function EMAs every N steps
        step_000500.safetensors    every profile's parameters as "SIGMA_REL/NAME", its step and
                                   the σ_rel and γ of each profile in the safetensors metadata

A checkpoint is written into ``checkpoints/.partial-*``: each file flushed and fsynced, the manifest
last, the folder fsynced; then the folder is renamed to ``step_NNNNNN`` and ``checkpoints/`` is
fsynced. That rename is the commit: a crash at any instant leaves either the finished checkpoint or
none at all beside the previous ones, and a reader only accepts a ``step_*`` folder whose manifest
lists files that are all there with their sizes. Only rank 0 writes. A snapshot is one file, made
atomically (:func:`atomic_path`); ``--keep`` never removes one, ``--overwrite`` removes them all.

Loading never unpickles code: ``.pt`` files go through ``torch.load(weights_only=True)`` and
weights otherwise live in safetensors files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from admkit.distributed import barrier, is_main_process
from admkit.errors import UserError

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
PLOT_NAME = "loss.png"
METRICS_PLOT_NAME = "metrics.png"
SAMPLES = "samples"
JUDGE_NAME = "judge.pt"
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
# Weights files that ``admkit ema`` adds to a checkpoint folder after it was committed.
ADDED_WEIGHTS = "phema_*.safetensors"
MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SNAPSHOT_FILE = re.compile(r"^step_(\d+)\.safetensors$")
# Folders a crashed writer may leave behind; never read, removed by the next writer.
_SCRATCH_PREFIXES = (".partial-", ".deleting-")


# --------------------------------------------------------------------------------------------
# Atomic files


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file inside ``path`` durable (a no-op where folders can't open)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Write the file at the yielded path (it keeps ``path``'s suffix, so ``np.savez`` and friends do
    not append another). On leaving the block the file is fsynced, renamed over ``path`` and the
    folder fsynced; on an error the temporary file is removed and ``path`` is untouched. An
    existing ``path`` is a user mistake unless ``overwrite`` is set.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    temporary = path.with_name(f".partial-{os.getpid()}-{path.name}")
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
        fsync_dir(path.parent)
    finally:
        if temporary.exists():
            temporary.unlink()


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as temporary:
        temporary.write_text(text)


# --------------------------------------------------------------------------------------------
# Run directory and config.json


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a run directory."""
    path = Path(run_dir) / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not an admkit run directory (no {CONFIG_NAME})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); fix or remove it") from None


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _clear_run_files(run_dir: Path) -> None:
    # Only what a run writes is removed: --overwrite on a folder holding other files keeps them.
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(run_dir / SNAPSHOTS, ignore_errors=True)
    shutil.rmtree(run_dir / SAMPLES, ignore_errors=True)
    for name in (CONFIG_NAME, LOG_NAME, PLOT_NAME, METRICS_PLOT_NAME, JUDGE_NAME):
        (run_dir / name).unlink(missing_ok=True)


def prepare_run_dir(
    run_dir: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    overwrite: bool = False,
    may_differ: tuple[str, ...] = (),
) -> Path:
    """Create a run directory, or check that an existing one holds the same run, to resume it.

    ``config`` is a JSON-able dict (nested dicts allowed). Resuming with other values is a user
    mistake, except for the dotted keys in ``may_differ`` (e.g. ``"train.steps"``), whose new
    values replace the stored ones. ``overwrite`` starts the run over: its checkpoints, log and
    config are removed (other files in the folder are left alone). Call on every rank: each one
    checks, rank 0 writes.
    """
    run_dir = Path(run_dir)
    config = json.loads(json.dumps(config))  # tuples become lists, as they will read back
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory; choose another --out")
    has_config = (run_dir / CONFIG_NAME).exists()
    if not overwrite:
        if has_config:
            old, new = _flatten(read_config(run_dir)), _flatten(config)
            changed = [
                f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
                for key in sorted(set(old) | set(new))
                if key not in may_differ and old.get(key) != new.get(key)
            ]
            if changed:
                raise UserError(
                    f"{run_dir} holds a run with other options ({'; '.join(changed[:4])}); rerun "
                    "with its options to resume it, pass --overwrite to start over, or choose a "
                    "new --out"
                )
        elif run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(
                f"{run_dir} exists and is not an admkit run directory (no {CONFIG_NAME}); choose "
                "a new --out or pass --overwrite"
            )
    barrier()  # every rank has checked the folder as it was before rank 0 changes it
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            _clear_run_files(run_dir)
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        config_path = run_dir / CONFIG_NAME
        if not config_path.exists() or config_path.read_text() != text:
            atomic_write_text(config_path, text, overwrite=True)
    barrier()
    return run_dir


# --------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    """The number of optimizer steps a checkpoint folder holds (from its ``step_N`` name)."""
    match = _STEP_DIR.match(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint folder (step_N)")
    return int(match.group(1))


def _read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    """The manifest of a complete checkpoint, or None for anything unfinished or damaged."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        if manifest.get("step") != checkpoint_step(checkpoint):
            return None
        for name, size in manifest["files"].items():
            if (checkpoint / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted((p for p in found if _read_manifest(p) is not None), key=checkpoint_step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none."""
    complete = list_checkpoints(run_dir)
    return complete[-1] if complete else None


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"training state key {where}.{key!r} must be a str or int")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not (value is None or isinstance(value, (torch.Tensor, bool, int, float, str))):
        raise TypeError(f"training state {where} is a {type(value).__name__}, not plain data")


def _commit(partial: Path, final: Path) -> None:
    """Publish a finished checkpoint folder: the one step that makes it visible."""
    os.replace(partial, final)
    fsync_dir(final.parent)


def _remove(folder: Path) -> None:
    # Renamed out of the step_N namespace first, so a crash mid-removal never leaves a half
    # deleted folder that still looks like a checkpoint.
    trash = folder.with_name(f".deleting-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    weights: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any],
    *,
    keep: int | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Write ``checkpoints/step_{step}`` atomically; returns its path (None on ranks other than 0).

    ``weights`` maps a name (``"model"``, ``"ema_0.9999"``) to a state dict, each stored as
    ``NAME.safetensors``; ``state`` is the training state, plain data and tensors only, stored
    with ``torch.save``. ``keep`` then prunes all but the newest ``keep`` complete checkpoints.
    """
    if not is_main_process():
        return None
    _check_plain(state, "state")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    if final.exists() and _read_manifest(final) is not None and not overwrite:
        raise UserError(f"checkpoint {final} already exists; pass --overwrite to replace it")
    for leftover in root.iterdir():
        if leftover.name.startswith(_SCRATCH_PREFIXES):
            shutil.rmtree(leftover, ignore_errors=True)
    partial = root / f".partial-{final.name}-{os.getpid()}"
    partial.mkdir()
    try:
        files = {}
        for name, state_dict in weights.items():
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"weights name {name!r} is not a plain file name")
            tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
            safetensors.torch.save_file(tensors, partial / f"{name}.safetensors")
            files[f"{name}.safetensors"] = None
        torch.save(dict(state), partial / STATE_FILE)
        files[STATE_FILE] = None
        for name in files:
            _fsync_file(partial / name)
            files[name] = (partial / name).stat().st_size
        manifest = {"format": "admkit-checkpoint", "version": 1, "step": step}
        manifest |= {"weights": list(weights), "files": files}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_file(partial / MANIFEST)
        fsync_dir(partial)
        if final.exists():  # a damaged folder, or a complete one with overwrite=True
            _remove(final)
        _commit(partial, final)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    if keep is not None:
        prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete checkpoints; returns the removed ones."""
    if keep < 1:
        raise UserError(f"--keep {keep} would delete every checkpoint; use 1 or more")
    complete = list_checkpoints(run_dir)
    removed = complete[:-keep]
    for checkpoint in removed:
        _remove(checkpoint)
    return removed


def weight_names(checkpoint: str | os.PathLike, *, added: bool = True) -> list[str]:
    """The weights a checkpoint holds, in the order they were saved (``model`` first), then
    (``added``) the post-hoc EMAs ``admkit ema`` put in its folder afterwards (sorted)."""
    manifest = _read_manifest(Path(checkpoint))
    if manifest is None:
        raise UserError(f"{checkpoint} is not a complete admkit checkpoint")
    names = list(manifest["weights"])
    if not added:
        return names
    added = sorted(path.stem for path in Path(checkpoint).glob(ADDED_WEIGHTS))
    return names + [name for name in added if name not in names]


def read_weights(checkpoint: str | os.PathLike, name: str = "model") -> dict[str, torch.Tensor]:
    """One state dict of a checkpoint folder (``model``, ``ema_RATE``, ``phema_S``), on the CPU."""
    names = weight_names(checkpoint)
    if name not in names:
        raise UserError(f"{checkpoint} has no weights {name!r}; it has {', '.join(names)}")
    try:
        return safetensors.torch.load_file(Path(checkpoint) / f"{name}.safetensors")
    except Exception as error:  # an added file is not covered by the manifest's sizes
        raise UserError(f"cannot read {name}.safetensors in {checkpoint} ({error})") from None


def read_training_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The training state of a checkpoint folder, read with ``weights_only=True`` onto the CPU."""
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=True)


def checkpoint_weights(
    checkpoint: str | os.PathLike, name: str | None = None
) -> dict[str, torch.Tensor]:
    """One state dict of a complete checkpoint folder.

    ``name`` None takes the first EMA the run was trained with (the first ``--ema_rate``), or the
    raw model weights when it kept no EMA.
    """
    if name is None:
        emas = [n for n in weight_names(checkpoint) if n.startswith("ema_")]
        name = emas[0] if emas else "model"
    return read_weights(checkpoint, name)


def run_weights(run_dir: str | os.PathLike, name: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of a run's newest checkpoint; ``name`` as in :func:`checkpoint_weights`."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"{run_dir} has no complete checkpoint yet; train it first")
    if name is not None and name not in weight_names(checkpoint):
        # Post-hoc EMAs live in the checkpoint of the step they were made for, maybe an older one.
        older = [c for c in list_checkpoints(run_dir)[:-1] if name in weight_names(c)]
        if older:
            raise UserError(
                f"the newest checkpoint of {run_dir} ({checkpoint.name}) has no weights {name!r}; "
                f"{older[-1].name} has: pass --model {older[-1]} --weights {name}"
            )
    return checkpoint_weights(checkpoint, name)


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named as a run's checkpoint folder (``RUN/checkpoints/step_N``)."""
    path = Path(path)
    return _STEP_DIR.match(path.name) is not None and path.parent.name == CHECKPOINTS


def config_dir(path: str | os.PathLike) -> Path | None:
    """Where the ``config.json`` that describes ``path`` lives, or None where nothing does.

    A run directory holds its own; a checkpoint folder and a weights file inside one take their
    run's; a ``.safetensors`` file takes a ``config.json`` beside it.
    """
    path = Path(path)
    if path.is_dir():
        return path.parent.parent if is_checkpoint_folder(path) else path
    if path.suffix != ".safetensors":
        return None
    if (path.parent / CONFIG_NAME).exists():
        return path.parent
    return path.parent.parent.parent if is_checkpoint_folder(path.parent) else None


# --------------------------------------------------------------------------------------------
# Snapshots of the power-function EMAs (--phema), for post-hoc EMA


def snapshot_step(path: str | os.PathLike) -> int:
    """The number of optimizer steps a snapshot file holds (from its ``step_N`` name)."""
    match = _SNAPSHOT_FILE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a snapshot file (step_N.safetensors)")
    return int(match.group(1))


def list_snapshots(run_dir: str | os.PathLike) -> list[Path]:
    """The snapshot files of a run, oldest first."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _SNAPSHOT_FILE.match(p.name)), key=snapshot_step)


def write_snapshot(
    run_dir: str | os.PathLike,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> Path:
    """Write ``snapshots/step_{step}.safetensors`` atomically (call on rank 0 only); one left by a
    run that crashed before its next checkpoint is replaced: the resumed run recomputes it."""
    folder = Path(run_dir) / SNAPSHOTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.safetensors"
    with atomic_path(path, overwrite=True) as temporary:
        safetensors.torch.save_file(dict(tensors), temporary, metadata=dict(metadata))
    return path


def drop_snapshots_after(run_dir: str | os.PathLike, step: int) -> None:
    """Remove the snapshots past ``step`` (and a killed writer's leftovers), so a run resumed
    from ``step`` reads as one uninterrupted run; it writes them again as it goes."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(_SCRATCH_PREFIXES) or (
            _SNAPSHOT_FILE.match(path.name) and snapshot_step(path) > step
        ):
            path.unlink()


# --------------------------------------------------------------------------------------------
# Random number generator state, as plain tensors so that weights_only loading reads it


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The state of the global torch (and CUDA ``device``), NumPy and Python generators."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_position": int(position),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached_gaussian),
        "python_version": int(version),
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss_next": gauss_next,
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Put back what :func:`capture_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (
            "MT19937",
            keys,
            state["numpy_position"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    internal = tuple(int(x) for x in state["python_internal"].tolist())
    random.setstate((state["python_version"], internal, state["python_gauss_next"]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
