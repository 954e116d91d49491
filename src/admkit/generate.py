"""Generating N images: batches, ``torchrun`` ranks, per-image seeds, cascades, npz and PNG files.

One ``Stage`` is one model and how to sample it (a model function, guidance already wrapped in,
its chain, a sampler by name); ``generate`` runs a list of stages per batch, so a cascade is the
base stage followed by an upsampler stage whose ``low_res`` is the previous stage's output.

Reproducibility: image i's starting noise x_T, every noise its sampler draws later (DDPM, DDIM
with η > 0, DPM-Solver++ 2M SDE, Heun's churn) and its random label come from generators seeded
by (seed, i, stream) alone. Image i is therefore the same whatever batch it is drawn in and
however many processes share the work (each rank takes indices rank, rank + W, ...; rank 0
gathers). Generators live on the sampling device, so a CPU and a GPU give different images for
one seed.

Output follows guided-diffusion (reference §8.1): x ∈ [-1, 1] becomes ((x + 1)·127.5) clamped to
[0, 255] and TRUNCATED to uint8, in NHWC order; ``.npz`` with ``arr_0`` and, when labels were
used, ``arr_1`` int64.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from admkit import distributed
from admkit.checkpoint import atomic_path, fsync_dir
from admkit.compilation import inductor_options
from admkit.diffusion import Diffusion, ModelFn
from admkit.errors import UserError
from admkit.guidance import CondFn
from admkit.noise import derived_seed, randn, seeded_generators
from admkit.partial_samples import PartialSamples
from admkit.samplers import get_sampler

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LABEL_STREAM = 0  # the generator stream of random labels; stages use 1, 2, ...
GRID_MAX_IMAGES = 256


@dataclass(frozen=True)
class Stage:
    """One model of a cascade and how it is sampled.

    Attributes:
        model_fn: ``model_fn(x_t, t_model, **model_kwargs)``, guidance wrappers included.
        diffusion: the chain to sample on (respaced to the steps wanted).
        shape: ``(C, H, W)`` of one image.
        sampler: a name in ``admkit.samplers.SAMPLERS``.
        options: sampler-specific keyword arguments (``eta``, ``s_churn``, ``noise_levels``).
        cond_fn: classifier guidance's condition function, or None.
        clip_denoised: clip x̂_0 to [-1, 1] at every step.
        denoised_fn: applied to x̂_0 before clipping (e.g. dynamic thresholding).
        noise_stream: which generator stream of each image this stage draws from.
        takes_low_res: pass the previous stage's images (or the given ones) as ``low_res``.
    """

    model_fn: ModelFn
    diffusion: Diffusion
    shape: tuple[int, int, int]
    sampler: str = "ddpm"
    options: Mapping[str, Any] = field(default_factory=dict)
    cond_fn: CondFn | None = None
    clip_denoised: bool = True
    denoised_fn: Callable[[Tensor], Tensor] | None = None
    noise_stream: int = 1
    takes_low_res: bool = False


@dataclass(frozen=True)
class Generated:
    """What ``generate`` returns: the images on rank 0 (None elsewhere) and their cost."""

    images: np.ndarray | None  # uint8 [N, H, W, 3]
    labels: np.ndarray | None  # int64 [N], when labels were used
    num_model_evals: tuple[int, ...]  # per image, per stage


# ---------------------------------------------------------------------------------------------
# Seeds and labels


def image_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for image ``index``'s generator on ``stream``."""
    if seed < 0 or index < 0 or stream < 0:
        raise ValueError(f"seed, index and stream must be non-negative, got {seed, index, stream}")
    return derived_seed(seed, index, stream)


def image_generators(
    seed: int, indices: Sequence[int], stream: int, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One ``torch.Generator`` per image index, on ``device``."""
    return seeded_generators((image_seed(seed, i, stream) for i in indices), device)


def draw_labels(
    num_samples: int, num_classes: int, seed: int, class_labels: Sequence[int] | None = None
) -> Tensor:
    """Labels ``[N]`` int64: ``class_labels`` cycled, or uniform in [0, K) per image index."""
    if class_labels:
        bad = [k for k in class_labels if not 0 <= k < num_classes]
        if bad:
            raise UserError(
                f"class label {bad[0]} is out of range: this model has {num_classes} classes, "
                f"so labels run from 0 to {num_classes - 1}"
            )
        return torch.tensor([class_labels[i % len(class_labels)] for i in range(num_samples)])
    labels = [
        int(torch.randint(num_classes, (), generator=g))
        for g in image_generators(seed, range(num_samples), LABEL_STREAM)
    ]
    return torch.tensor(labels, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Pixels


def quantize(x: Tensor) -> Tensor:
    """[-1, 1] ``[N, C, H, W]`` → uint8 ``[N, H, W, C]``, truncating as guided-diffusion does."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def dequantize(images: Tensor | np.ndarray) -> Tensor:
    """uint8 ``[N, H, W, C]`` → float32 ``[N, C, H, W]`` in [-1, 1] as x/127.5 - 1 (§8.3)."""
    images = torch.as_tensor(images)
    return (images.float() / 127.5 - 1).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# Networks as model functions


def compiled_for_sampling(network: torch.nn.Module) -> Callable[..., Tensor]:
    """``network`` compiled by ``torch.compile`` for sampling, with inductor's freezing: the
    weights become constants that it may fold and pre-pack (measured in
    ``benchmarks/README.md``). The network must only be read while sampling (no gradients, no
    weight updates). Results equal eager ones to rounding.

    Compilation happens at the first call of each batch shape and fails there when a platform
    lacks a working compiler: that call, and every later one, then runs eagerly after a warning.
    """
    try:
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        compiled = torch.compile(network, options=inductor_options(device, freezing=True))
    except Exception as error:  # a platform where torch.compile cannot even wrap the module
        _compile_failed(error)
        return network

    def run(*args: Tensor, **kwargs: Tensor) -> Tensor:
        nonlocal compiled
        if compiled is not network:
            try:
                return compiled(*args, **kwargs)
            except Exception as error:
                _compile_failed(error)
                compiled = network
        return network(*args, **kwargs)

    return run


def _compile_failed(error: Exception) -> None:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    warnings.warn(f"torch.compile failed ({first_line}); sampling without it", stacklevel=3)


def network_fn(
    network: Callable[..., Tensor],
    *,
    class_conditional: bool,
    precision: str = "fp32",
    device: torch.device | str = "cpu",
) -> ModelFn:
    """A network as a model function: autocast to ``precision``, float32 output.

    An unconditional network never sees labels (as guided-diffusion's classifier_sample drops
    them), so the same ``y`` can feed a classifier or a class-conditional upsampler.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    dtype, device_type = PRECISIONS[precision], torch.device(device).type

    def model_fn(x: Tensor, t: Tensor, y: Tensor | None = None, **kwargs: Tensor) -> Tensor:
        if class_conditional:
            kwargs["y"] = y
        context = torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()
        with context:
            return network(x, t, **kwargs).float()

    return model_fn


# ---------------------------------------------------------------------------------------------
# The loop


def _sample_batch(
    stages: Sequence[Stage],
    indices: list[int],
    *,
    seed: int,
    labels: Tensor | None,
    low_res: np.ndarray | None,
    device: torch.device,
    progress: bool,
) -> tuple[Tensor, list[int]]:
    """Images ``indices`` through every stage: uint8 ``[n, H, W, C]`` on ``device``."""
    previous = None
    if low_res is not None:
        previous = dequantize(low_res[np.asarray(indices) % len(low_res)]).to(device)
    kwargs: dict[str, Tensor] = {}
    if labels is not None:
        kwargs["y"] = labels[indices].to(device)
    images, evals = None, []
    for stage in stages:
        generators = image_generators(seed, indices, stage.noise_stream, device)
        x_T = randn((len(indices), *stage.shape), generator=generators, device=device)
        stage_kwargs = dict(kwargs)
        if stage.takes_low_res:
            if previous is None:
                raise ValueError("an upsampler stage needs low-resolution input")
            stage_kwargs["low_res"] = previous
        result = get_sampler(stage.sampler)(
            stage.diffusion,
            stage.model_fn,
            x_T,
            model_kwargs=stage_kwargs,
            cond_fn=stage.cond_fn,
            clip_denoised=stage.clip_denoised,
            denoised_fn=stage.denoised_fn,
            generator=generators,
            progress=progress,
            **stage.options,
        )
        images = quantize(result.sample)
        # The next stage sees exactly what a saved file would give it (admkit upsample).
        previous = dequantize(images)
        evals.append(result.num_model_evals)
    return images, evals


def generate(
    stages: Sequence[Stage],
    *,
    num_samples: int,
    batch_size: int = 16,
    seed: int = 0,
    labels: Tensor | None = None,
    low_res: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    partial: PartialSamples | None = None,
    shard: bool = True,
    description: str | None = None,
    step_progress: bool = True,
) -> Generated:
    """Sample ``num_samples`` images through ``stages``, ``batch_size`` at a time per process.

    ``labels`` ``[N]`` (one per image index) go to every stage as ``y``; ``low_res`` uint8
    ``[M, h, w, 3]`` feeds a first stage that ``takes_low_res`` (image i reads row i mod M).
    Under ``torchrun`` the images still to draw are dealt out to the ranks in turn and rank 0
    gathers; all ranks must call this. With ``shard=False`` this process draws every image
    itself and returns them, whatever the process group (no collectives). With ``partial``, the
    images it holds are not drawn again and each gathered batch is added to it. Returns the
    images on rank 0 (``images`` None on the others). ``progress`` shows a bar of images,
    labelled ``description``, and with ``step_progress`` one of each batch's sampler steps.
    """
    if num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if labels is not None and len(labels) != num_samples:
        raise ValueError(f"got {len(labels)} labels for {num_samples} images")
    device = torch.device(device)
    rank, world = (distributed.rank(), distributed.world_size()) if shard else (0, 1)
    main = rank == 0
    done = set(partial.done) if partial is not None else set()
    remaining = [i for i in range(num_samples) if i not in done]
    mine = remaining[rank::world]
    rounds = math.ceil(math.ceil(len(remaining) / world) / batch_size)
    channels, height, width = stages[-1].shape
    images = np.zeros((num_samples, height, width, channels), np.uint8) if main else None
    evals: list[int] | tuple[int, ...] = ()
    if done and main:
        evals = partial.load_into(images)
    bar = tqdm(
        total=num_samples,
        initial=len(done),
        unit="img",
        desc=description,
        disable=not (progress and main),
    )
    for round_index in range(rounds):
        indices = mine[round_index * batch_size : (round_index + 1) * batch_size]
        # Every rank joins every gather; a rank out of images sends padding (index -1).
        batch = torch.zeros(batch_size, height, width, channels, dtype=torch.uint8, device=device)
        ids = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        if indices:
            sampled, evals = _sample_batch(
                stages,
                indices,
                seed=seed,
                labels=labels,
                low_res=low_res,
                device=device,
                progress=progress and step_progress and main,
            )
            batch[: len(indices)] = sampled
            ids[: len(indices)] = torch.tensor(indices, device=device)
        if shard:
            batch, ids = distributed.all_gather_cat(batch), distributed.all_gather_cat(ids)
        if main:
            keep = ids >= 0
            kept_ids, kept = ids[keep].cpu().numpy(), batch[keep].cpu().numpy()
            images[kept_ids] = kept
            if partial is not None and len(kept_ids):
                partial.add(kept_ids, kept, tuple(evals))
            bar.update(len(kept_ids))
    bar.close()
    label_array = labels.cpu().numpy().astype(np.int64) if labels is not None else None
    return Generated(images=images, labels=label_array, num_model_evals=tuple(evals))


# ---------------------------------------------------------------------------------------------
# Files


def check_outputs(
    paths: Sequence[str | os.PathLike | None],
    overwrite: bool,
    folder: str | os.PathLike | None = None,
) -> None:
    """Refuse, before any work, to replace an existing output without ``--overwrite``:
    files at ``paths`` and an image ``folder``."""
    for path, is_folder in [*((path, False) for path in paths), (folder, True)]:
        if path is None:
            continue
        if os.path.exists(path) and os.path.isdir(path) != is_folder:
            if is_folder:
                raise UserError(f"{path} is a file; give a folder for the images")
            raise UserError(f"output {path} is a folder; give a file name")
        if os.path.exists(path) and not overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UserError(f"cannot write {path}: folder {parent} does not exist")


def save_samples(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write ``arr_0`` (uint8 ``[N, H, W, 3]``) and ``arr_1`` (int64 labels) atomically."""
    arrays = [images] if labels is None else [images, labels.astype(np.int64)]
    with atomic_path(path, overwrite=overwrite) as temporary:
        # A file object, so that np.savez never appends ".npz" to the temporary name.
        with open(temporary, "wb") as f:
            np.savez(f, *arrays)


def image_grid(images: np.ndarray, max_images: int = GRID_MAX_IMAGES) -> np.ndarray:
    """The first ``max_images`` of uint8 ``[N, H, W, 3]`` tiled into a near-square grid, with
    small images enlarged (nearest neighbour) to at least 64 pixels so they can be seen."""
    images = images[:max_images]
    n, h, w, c = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    scale = max(1, 64 // max(h, w))
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(path: str | os.PathLike, images: np.ndarray, *, overwrite: bool = False) -> None:
    """Write ``image_grid(images)`` as a PNG, atomically."""
    with atomic_path(path, overwrite=overwrite) as temporary:
        Image.fromarray(image_grid(images)).save(temporary, format="PNG")


def save_image_folder(
    folder: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write each image as a PNG into ``folder``, named the way admkit (and guided-diffusion)
    read classes from file names: ``{class}_{index:06d}.png``, or ``{index:06d}.png`` without
    labels. The class is its name from ``class_names`` where there is one, else the label; so
    the folder serves as ``--data`` or a reference batch's source with the same classes.

    The images go into a scratch folder beside ``folder`` that is renamed into place at the end:
    an interrupted write leaves no partial folder, and an existing ``folder`` (replaced only
    with ``overwrite``) stays whole until then.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise UserError(f"{folder} already exists; pass --overwrite to replace it")
    scratch = folder.with_name(f".partial-{os.getpid()}-{folder.name}")
    old = folder.with_name(f".deleting-{os.getpid()}-{folder.name}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        for index, image in enumerate(images):
            name = f"{index:06d}.png"
            if labels is not None:
                label = int(labels[index])
                known = class_names is not None and 0 <= label < len(class_names)
                # A name holds no "_" (the class is the prefix before the first one) and no "/".
                prefix = class_names[label] if known else str(label)
                name = prefix.replace("_", "-").replace("/", "-") + "_" + name
            Image.fromarray(image).save(scratch / name, format="PNG")
        if folder.exists():
            os.replace(folder, old)
        os.replace(scratch, folder)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
