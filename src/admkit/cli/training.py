"""What the three training commands share: options, config.json, the run.

``admkit train``, ``train-classifier`` and ``train-upsampler`` differ only in the network they
build and the loss (``admkit.objectives``) they hand to :func:`admkit.train.train`; everything
else lives here.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from admkit import distributed
from admkit.checkpoint import checkpoint_step, latest_checkpoint
from admkit.cli.models import load_initial_weights
from admkit.cli.options import spellings
from admkit.compat.script_util import str2bool
from admkit.data import (
    DIGITS_SPECS,
    ImageDataset,
    ImageFolderDataset,
    iterate_batches,
    open_dataset,
)
from admkit.diffusion import Diffusion
from admkit.errors import UserError
from admkit.objectives import DiffusionLoss
from admkit.timestep_sampling import SCHEDULE_SAMPLERS, schedule_sampler
from admkit.train import SNAPSHOT_DTYPES, AfterStep, TrainConfig, train

# Per-kind defaults: guided-diffusion's learning rates and EMA (its classifiers keep none).
DEFAULTS = {
    "diffusion": {"lr": 1e-4, "ema_rate": "0.9999"},
    "upsampler": {"lr": 1e-4, "ema_rate": "0.9999"},
    "classifier": {"lr": 3e-4, "ema_rate": ""},
}
DEFAULT_BATCH_SIZE = 32
DEFAULT_SAVE_INTERVAL = 5000


# --------------------------------------------------------------------------------------------
# Options


def add_flag(group: Any, name: str, *aliases: str, default: Any = None, help: str) -> None:
    """A boolean option that takes ``True/False`` (guided-diffusion style) or stands alone."""
    names = spellings(name) + [n for alias in aliases for n in spellings(alias)]
    group.add_argument(
        *names, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--data`` and ``--out``."""
    parser.add_argument(
        *spellings("data"),
        *spellings("data_dir"),
        dest="data",
        required=True,
        metavar="DATA",
        help="image folder (class = file-name prefix before '_'), .npz (arr_0 uint8 NHWC, "
        "optional arr_1 labels), or 'digits'",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="RUN",
        help="run directory; rerunning the same command resumes it",
    )


def add_training_options(parser: argparse.ArgumentParser, kind: str) -> None:
    """The training options of SPEC §2.2 with ``kind``'s defaults."""
    lr, ema_rate = DEFAULTS[kind]["lr"], DEFAULTS[kind]["ema_rate"]
    group = parser.add_argument_group("training options")
    steps_names = spellings("steps") + (spellings("iterations") if kind == "classifier" else [])
    group.add_argument(
        *steps_names,
        dest="steps",
        type=int,
        metavar="N",
        help="total optimizer steps (default: --lr_anneal_steps); may grow when resuming",
    )
    # (name, type, default, metavar, help)
    table = [
        ("batch_size", int, DEFAULT_BATCH_SIZE, "N", "global batch, split over the processes"),
        ("microbatch", int, -1, "N", "examples per forward pass on each process, to save "
         "memory; must divide the per-process batch (-1: all at once)"),
        ("lr", float, lr, "LR", "AdamW learning rate"),
        ("weight_decay", float, 0.0, "W", "AdamW weight decay"),
        ("lr_anneal_steps", int, 0, "N", "decay the learning rate linearly to 0 at step N "
         "(0: constant)"),
        ("ema_rate", str, ema_rate, "RATES", "comma list of EMA rates, e.g. 0.9999,0.999 ('': "
         "none); rate**steps of the initial weights remain, so short runs want lower rates"),
        ("phema", str, None, "S1,S2", "post-hoc EMA (EDM2): track power-function EMAs of these "
         "relative widths sigma_rel, e.g. 0.05,0.10, and store their snapshots, from which "
         "'admkit ema' makes any other EMA length after training (default: none)"),
        ("snapshot_interval", int, None, "N", "store a --phema snapshot every N steps and at the "
         "end (default: --save_interval)"),
        ("save_interval", int, DEFAULT_SAVE_INTERVAL, "N", "checkpoint every N steps and at "
         "the end"),
        ("log_interval", int, 10, "N", "a log.jsonl record every N steps"),
        ("keep", int, None, "N", "keep only the newest N checkpoints (default: all)"),
        ("seed", int, 0, "N", "seed of the initial weights, batch order and every draw"),
        ("init_from", str, None, "WEIGHTS", "fine-tune: start from these weights (a run "
         "directory, checkpoint folder, .safetensors or released .pt that fits the model "
         "options) instead of random ones; EMAs start from them too"),
        ("num_workers", int, None, "N", "data loading processes (default: 2 for image "
         "folders, 0 for in-memory data)"),
        ("device", str, None, "DEVICE", "cpu, cuda or cuda:N (default: a GPU if any)"),
    ]  # fmt: skip
    for name, type_, default, metavar, help_text in table:
        if default is not None and "default" not in help_text:
            help_text += f" (default: {default!r})"
        group.add_argument(
            *spellings(name), type=type_, default=default, metavar=metavar, help=help_text
        )
    if kind == "classifier":
        add_flag(group, "anneal_lr", help="guided-diffusion's name: anneal over --steps")
    group.add_argument(
        *spellings("precision"),
        choices=("fp32", "bf16", "fp16"),
        help="autocast precision (default: fp16 with --use_fp16 True, else fp32)",
    )
    group.add_argument(
        *spellings("snapshot_dtype"),
        choices=tuple(SNAPSHOT_DTYPES),
        help="precision of the stored --phema snapshots (default: fp32; fp16 or bf16 halve the "
        "files, and their rounding then carries into the reconstructions)",
    )
    add_flag(
        group,
        "random_flip",
        help="flip training images horizontally at random (default: True, as guided-diffusion; "
        "False for the built-in digits, whose mirror images are not digits)",
    )
    add_flag(group, "compile", default=False, help="torch.compile the model (default: False)")
    group.add_argument(
        "--overwrite", action="store_true", help="start the run over, deleting its checkpoints"
    )


def add_diffusion_loss_options(parser: argparse.ArgumentParser) -> None:
    """``--schedule_sampler`` and ``--cfg_dropout`` (diffusion models and upsamplers)."""
    group = parser.add_argument_group("objective")
    group.add_argument(
        *spellings("schedule_sampler"),
        choices=tuple(SCHEDULE_SAMPLERS),
        default="uniform",
        help="how timesteps are drawn (default: uniform)",
    )
    group.add_argument(
        *spellings("cfg_dropout"),
        type=float,
        default=0.0,
        metavar="P",
        help="replace the label by a null label with probability P, so the model also serves "
        "classifier-free guidance (needs --class_cond True)",
    )


# --------------------------------------------------------------------------------------------
# Data, labels, training configuration


def say(message: str) -> None:
    """Print on the process that writes (rank 0 of a torchrun job)."""
    if distributed.launch_env().rank == 0:
        print(message, flush=True)


def open_training_data(
    spec: str, image_size: int, random_flip: bool | None, command: str
) -> ImageDataset:
    """The dataset of ``--data``; its warnings (small or unreadable images) become one line each."""
    flip = random_flip if random_flip is not None else spec not in DIGITS_SPECS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = open_dataset(spec, image_size, random_flip=flip)
    if distributed.launch_env().rank == 0:
        for warning in caught:
            print(f"admkit {command}: warning: {warning.message}", file=sys.stderr)
    return dataset


def data_source(spec: str) -> str:
    """``--data`` as recorded in config.json: absolute, so a resume from elsewhere matches."""
    return spec if spec in DIGITS_SPECS else str(Path(spec).resolve())


def label_rows(
    dataset: ImageDataset, requested: int | None, cfg_dropout: float
) -> tuple[int, int | None]:
    """(K real classes, null label or None) for a class-conditional model on ``dataset``."""
    data_classes = dataset.num_classes
    if data_classes == 0:
        raise UserError(
            f"{dataset.source} has no labels: class-conditional training needs labelled data "
            "(arr_1 in an .npz, or file-name prefixes in a folder); or pass --class_cond False"
        )
    num_classes = data_classes if requested is None else requested
    if num_classes < data_classes:
        raise UserError(
            f"--num_classes {num_classes} is fewer than the {data_classes} classes in "
            f"{dataset.source}; leave it out to use the data's count"
        )
    if not 0.0 <= cfg_dropout <= 1.0:
        raise UserError(f"--cfg_dropout {cfg_dropout} must be a probability between 0 and 1")
    return num_classes, (num_classes if cfg_dropout > 0 else None)


def conditioning(
    flags: dict[str, Any], dataset: ImageDataset, cfg_dropout: float
) -> tuple[int | None, int | None]:
    """(K, null label) of a diffusion model on ``dataset``; sets ``flags["num_classes"]``.

    Unconditional: (None, None). Class-conditional: K from the data (or ``--num_classes``),
    and with label dropout the null label K, one more row of the label embedding.
    """
    if not flags["class_cond"]:
        if cfg_dropout > 0:
            raise UserError("--cfg_dropout drops class labels: it needs --class_cond True")
        flags["num_classes"] = None
        return None, None
    num_classes, null_label = label_rows(dataset, flags.get("num_classes"), cfg_dropout)
    flags["num_classes"] = num_classes + (1 if null_label is not None else 0)
    return num_classes, null_label


def parse_ema_rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"--ema_rate {text!r} must be a comma list of numbers, e.g. 0.9999,0.999"
        ) from None


def parse_phema(text: str | None) -> tuple[str, ...]:
    """``--phema 0.05,0.10`` as typed (the labels name the weights: ``phema_0.10``); ``''``:
    none, as for ``--ema_rate``."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def train_config(args: argparse.Namespace, *, use_fp16: bool = False) -> TrainConfig:
    """The loop's configuration from the options; bad values are one-line user errors."""
    steps = args.steps
    anneal = args.lr_anneal_steps
    if steps is None:
        if anneal <= 0:
            raise UserError("give the number of optimizer steps with --steps N")
        steps = anneal
    if getattr(args, "anneal_lr", False):
        anneal = steps
    world_size = distributed.launch_env().world_size
    if args.batch_size < 1 or args.batch_size % world_size:
        raise UserError(
            f"--batch_size {args.batch_size} must be a positive multiple of the {world_size} "
            "processes"
        )
    local = args.batch_size // world_size
    if args.microbatch > 0 and local % args.microbatch:
        raise UserError(
            f"--microbatch {args.microbatch} does not divide the per-process batch {local} "
            f"(--batch_size {args.batch_size} over {world_size} processes)"
        )
    if args.num_workers is not None and args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers} must be zero or positive")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed} must be zero or positive")
    precision = args.precision or ("fp16" if use_fp16 else "fp32")
    return TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        microbatch=max(args.microbatch, 0),
        lr=args.lr,
        weight_decay=args.weight_decay,
        lr_anneal_steps=anneal,
        ema_rates=parse_ema_rates(args.ema_rate),
        precision=precision,
        seed=args.seed,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        keep=args.keep,
        compile=bool(args.compile),
        phema=parse_phema(args.phema),
        snapshot_interval=args.snapshot_interval,
        snapshot_dtype=args.snapshot_dtype or "fp32",
    )


def check_out(out: str) -> None:
    """Fail before loading data when ``--out`` cannot be a run directory."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file, not a run directory; choose another --out")


# --------------------------------------------------------------------------------------------
# The objective, from the options


def diffusion_objective(
    args: argparse.Namespace,
    flags: Mapping[str, Any],
    diffusion: Diffusion,
    null_label: int | None,
    *,
    small_size: int | None = None,
) -> tuple[DiffusionLoss, dict[str, Any]]:
    """The loss of ``admkit train`` from the objective options, and its record for config.json;
    with ``small_size``, an upsampler's (``train-upsampler``, with its ``--lowres_*`` options)."""
    objective = {"schedule_sampler": args.schedule_sampler, "cfg_dropout": args.cfg_dropout}
    if small_size is not None:
        objective |= {"lowres_noise": args.lowres_noise, "lowres_blur": args.lowres_blur}
    loss_fn = DiffusionLoss(
        diffusion,
        schedule_sampler(args.schedule_sampler, diffusion.num_timesteps),
        class_cond=flags["class_cond"],
        cfg_dropout=args.cfg_dropout,
        null_label=null_label,
        small_size=small_size,
        lowres_noise=objective.get("lowres_noise", 0.0),
        lowres_blur=objective.get("lowres_blur", 0.0),
    )
    return loss_fn, objective


# --------------------------------------------------------------------------------------------
# The run


def batch_source(
    dataset: ImageDataset,
    config: TrainConfig,
    num_workers: int | None,
    before_step: Callable[[int], None] | None = None,
) -> Callable[[int], Iterator[Any]]:
    """``batches(start_step)`` for the loop: this rank's share of each step's global batch.

    ``before_step(step)`` runs as the batch of ``step`` is drawn, when ``step`` updates are done.
    """
    if num_workers is None:
        # In-memory data (digits, .npz) is faster without worker processes to feed.
        num_workers = 2 if isinstance(dataset, ImageFolderDataset) else 0

    def batches(start_step: int) -> Iterator[Any]:
        loader = iterate_batches(
            dataset,
            config.batch_size,
            seed=config.seed,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
            start_step=start_step,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        for step, batch in enumerate(loader, start_step):
            if before_step is not None:
                before_step(step)
            yield batch

    return batches


def run_config(
    kind: str,
    flags: Mapping[str, Any],
    dataset: ImageDataset,
    spec: str,
    *,
    num_classes: int | None,
    cfg_null_label: int | None,
    objective: Mapping[str, Any],
) -> dict[str, Any]:
    """config.json (without the training options, which the loop adds under ``train``).

    ``kind``, ``flags`` (with ``num_classes`` = rows of the label embedding or classifier
    outputs), ``num_classes`` (real classes), ``cfg_null_label`` and ``class_names`` are what
    the sampling commands read; ``data`` and ``objective`` make a resume with other data or
    another loss a clear error.
    """
    return {
        "kind": kind,
        "flags": dict(flags),
        "num_classes": num_classes,
        "cfg_null_label": cfg_null_label,
        "class_names": list(dataset.class_names) if num_classes is not None else None,
        "data": {
            "source": data_source(spec),
            "num_images": len(dataset),
            "image_size": dataset.image_size,
            "random_flip": bool(dataset.random_flip),
        },
        "objective": dict(objective),
    }


def fit(
    args: argparse.Namespace,
    command: str,
    network: torch.nn.Module,
    loss_fn: Any,
    dataset: ImageDataset,
    config: TrainConfig,
    config_json: Mapping[str, Any],
    *,
    on_log: Callable[[int], Mapping[str, float] | None] | None = None,
    before_step: Callable[[int], None] | None = None,
    after_step: AfterStep | None = None,
) -> int:
    """Train (or resume) the run; leaves no process group or signal handler behind."""
    num_parameters = sum(p.numel() for p in network.parameters())
    classes = config_json.get("num_classes")
    say(
        f"admkit {command}: {num_parameters / 1e6:.2f}M parameters, {len(dataset)} images from "
        f"{dataset.source}" + (f" in {classes} classes" if classes else "") + f" -> {args.out}"
    )
    if args.init_from is not None:
        # Recorded in config.json (absolute, as --data), so that resuming with other weights is
        # a clear error; a run that has a checkpoint resumes from it and does not read them again.
        config_json = {**config_json, "init_from": str(Path(args.init_from).resolve())}
        if args.overwrite or latest_checkpoint(args.out) is None:
            load_initial_weights(network, args.init_from, config_json["kind"])
            say(f"admkit {command}: starting from the weights in {args.init_from}")
    joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        final = train(
            network,
            loss_fn,
            batch_source(dataset, config, args.num_workers, before_step),
            config,
            args.out,
            run_config=config_json,
            device=args.device,
            overwrite=args.overwrite,
            on_log=on_log,
            after_step=after_step,
        )
    except BaseException:
        if joined_here and torch.distributed.is_initialized():
            # No farewell barrier: the other processes may not reach one after an error.
            torch.distributed.destroy_process_group()
        raise
    if joined_here:
        distributed.teardown()
    if final is not None:
        say(f"admkit {command}: step {checkpoint_step(final)} saved in {os.fspath(final)}")
    return 0
