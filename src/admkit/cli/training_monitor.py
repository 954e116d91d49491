"""``--sample_every N`` and the options that go with it, for ``admkit train`` and
``admkit train-upsampler``: a sample grid every N steps and, with something to score against,
metrics in the run's log (:mod:`admkit.monitor` does the work; this module checks the options
before training starts and wires them to it).

What is scored:

* ``--eval_ref REF.npz``: the paper's evaluator against that reference batch (``eval_fid``,
  ``eval_sfid``, ``eval_precision``, ``eval_recall``, ``eval_inception_score``), with the
  Inception weights of ``--inception_weights`` or where ``admkit evaluate`` finds them;
* else, on the built-in digits (``--data digits``, ``digits:train``, ``digits:heldout``): the
  digits judge (``eval_frechet_distance``, ``eval_precision``, ``eval_recall`` in its features,
  and ``eval_judged_accuracy`` where the images have labels), trained once per run and kept as
  ``RUN/judge.pt``;
* else nothing: grids only.

``admkit train`` samples the model: the grid's labels cycle 0, 1, ..., K-1 (a grid whose width is
a multiple of K shows one class per column), the evaluation's are drawn uniformly per image, as
``admkit sample`` draws them. ``admkit train-upsampler`` upsamples the first images of the
training data, area-downsampled as its loss does (``make_low_res``, then rounded to uint8 as a
saved base sample is), with their labels: a class-conditional upsampler is given them, and the
digits judge checks that the upsampled digit is still the one it was.

None of these options is recorded in ``config.json``: they do not change the weights, so a
resumed run may change them.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import numpy as np
import torch

from admkit import distributed, quality
from admkit.checkpoint import JUDGE_NAME
from admkit.cli.options import spellings
from admkit.cli.sampling import (
    BASE_STREAM,
    UPSAMPLER_STREAM,
    image_shape,
    sampler_options,
    sampling_chain,
)
from admkit.data import DIGITS_SPECS, ImageDataset, make_low_res
from admkit.diffusion import Diffusion
from admkit.errors import UserError
from admkit.generate import GRID_MAX_IMAGES, Stage, draw_labels, network_fn, quantize
from admkit.metrics.evaluate import open_batch, read_precomputed_statistics
from admkit.metrics.inception_weights import load_inception
from admkit.monitor import Monitor, MonitorConfig, SampleSet, ScorerFactory
from admkit.samplers import SAMPLERS
from admkit.train import TrainConfig, kept_weight_names

DEFAULT_SAMPLER = "dpm++2m-sde"  # stochastic, second order: good images at 20 evaluations
DEFAULT_STEPS = 20
DEFAULT_GRID = 64
DEFAULT_EVAL_SAMPLES = 500
MIN_EVAL_SAMPLES = 4  # precision and recall compare each image with its 3 nearest neighbours
DEPENDENT_OPTIONS = (
    "sample_weights",
    "sample_sampler",
    "sample_steps",
    "sample_grid",
    "sample_batch_size",
    "eval_samples",
    "eval_ref",
    "inception_weights",
)
LOW_RES_CHUNK = 256  # training images downsampled at a time for an upsampler's inputs


def add_monitor_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "samples and metrics during training",
        "A grid from the same noise every N steps and, on the built-in digits or with "
        "--eval_ref, metrics in log.jsonl and metrics.png. Resuming may change these options.",
    )
    # (name, type, metavar, help)
    table = [
        ("sample_every", int, "N", "write RUN/samples/step_N.png every N steps and at the end, "
         "and evaluate there (default: never)"),
        ("sample_weights", str, "NAME", "weights to sample: model, ema_RATE or phema_S "
         "(default: the first --ema_rate, else model)"),
        ("sample_sampler", str, "NAME", f"one of {', '.join(SAMPLERS)} (default: "
         f"{DEFAULT_SAMPLER})"),
        ("sample_steps", int, "K", f"network evaluations per image, as admkit sample's --steps "
         f"(default: {DEFAULT_STEPS}, or all the model's steps if fewer)"),
        ("sample_grid", int, "K", f"images in the grid, at most {GRID_MAX_IMAGES}; labels cycle "
         f"over the classes (default: {DEFAULT_GRID})"),
        ("sample_batch_size", int, "N", "images per batch on each process (default: the "
         "per-process training batch, or --microbatch)"),
        ("eval_samples", int, "K", f"images to score at each evaluation (default: "
         f"{DEFAULT_EVAL_SAMPLES} when there is something to score against; 0: grids only)"),
        ("eval_ref", str, "REF.npz", "score against this reference batch with the Inception "
         "evaluator (FID, sFID, precision, recall, IS); without it the built-in digits are "
         "scored by the digits judge"),
        ("inception_weights", str, "PATH", "FID Inception weights for --eval_ref (default: "
         "$ADMKIT_INCEPTION or the torch hub cache, as admkit evaluate)"),
    ]  # fmt: skip
    for name, type_, metavar, help_text in table:
        group.add_argument(*spellings(name), type=type_, metavar=metavar, help=help_text)


def check_monitor_options(args: argparse.Namespace, flags: dict, config: TrainConfig) -> None:
    """Check the options before any data is read, and put their defaults into ``args``."""
    if args.sample_every is None:
        given = [name for name in DEPENDENT_OPTIONS if getattr(args, name) is not None]
        if given:
            raise UserError(
                f"--{given[0]} goes with --sample_every N (samples and metrics every N steps); "
                f"add --sample_every or drop --{given[0]}"
            )
        return
    if args.sample_every < 1:
        raise UserError(f"--sample_every {args.sample_every} must be at least 1")
    kept = kept_weight_names(config)
    if args.sample_weights is None:
        args.sample_weights = next((name for name in kept if name.startswith("ema_")), "model")
    elif args.sample_weights not in kept:
        raise UserError(
            f"--sample_weights {args.sample_weights}: this run keeps {', '.join(kept)}; "
            "pick one of them"
        )
    args.sample_sampler = args.sample_sampler or DEFAULT_SAMPLER
    if args.sample_sampler not in SAMPLERS:
        raise UserError(
            f"--sample_sampler {args.sample_sampler!r} is not a sampler; choose one of: "
            f"{', '.join(SAMPLERS)}"
        )
    args.sample_steps = _sample_steps(args.sample_steps, args.sample_sampler, flags)
    args.sample_grid = DEFAULT_GRID if args.sample_grid is None else args.sample_grid
    if not 1 <= args.sample_grid <= GRID_MAX_IMAGES:
        raise UserError(f"--sample_grid {args.sample_grid} must be between 1 and {GRID_MAX_IMAGES}")
    if args.sample_batch_size is None:
        world_size = distributed.launch_env().world_size
        args.sample_batch_size = config.microbatch or config.batch_size // world_size
    if args.sample_batch_size < 1:
        raise UserError(f"--sample_batch_size {args.sample_batch_size} must be at least 1")
    _check_evaluation(args)


def _sample_steps(steps: int | None, sampler: str, flags: dict) -> int:
    """``--sample_steps``, or its default, checked against the model's chain."""
    num_timesteps = flags["diffusion_steps"]
    # heun evaluates 2·levels - 1 times; the others once per level (levels_for_steps).
    most = 2 * num_timesteps - 1 if sampler == "heun" else num_timesteps
    least = 3 if sampler == "heun" else 1
    if steps is None:
        return min(DEFAULT_STEPS, most)
    if not least <= steps <= most:
        raise UserError(
            f"--sample_steps {steps} must be between {least} and {most} for {sampler} on a "
            f"{num_timesteps}-step model"
        )
    return steps


def _check_evaluation(args: argparse.Namespace) -> None:
    if args.inception_weights is not None and args.eval_ref is None:
        raise UserError(
            "--inception_weights is for scoring against a reference batch: add --eval_ref REF.npz"
        )
    if args.eval_samples is not None and (
        args.eval_samples < 0 or 0 < args.eval_samples < MIN_EVAL_SAMPLES
    ):
        raise UserError(
            f"--eval_samples {args.eval_samples} must be at least {MIN_EVAL_SAMPLES} (precision "
            "and recall look at each image's 3 nearest neighbours), or 0 for grids only"
        )
    scorable = args.eval_ref is not None or args.data in DIGITS_SPECS
    if args.eval_samples and not scorable:
        raise UserError(
            f"--eval_samples {args.eval_samples} needs something to score against: --eval_ref "
            "REF.npz (on --data digits the digits judge scores by itself)"
        )
    if args.eval_samples is None:
        args.eval_samples = DEFAULT_EVAL_SAMPLES if scorable else 0
    if args.eval_ref is None:
        return
    if args.eval_samples == 0:
        raise UserError("--eval_ref with --eval_samples 0 scores nothing; drop one of them")
    if not Path(args.eval_ref).is_file():
        raise UserError(
            f"--eval_ref {args.eval_ref}: no such file; give a reference batch .npz (admkit "
            "ref-batch makes one)"
        )
    open_batch(args.eval_ref, "reference")
    read_precomputed_statistics(args.eval_ref)
    # Read the weights now, not at the first evaluation, many steps into the run.
    load_inception(args.inception_weights)


def build_monitor(
    args: argparse.Namespace,
    kind: str,
    flags: dict,
    config: TrainConfig,
    network: torch.nn.Module,
    dataset: ImageDataset,
    num_classes: int | None,
) -> Monitor | None:
    """The training loop's ``after_step`` for the checked options, or None without
    ``--sample_every``. ``network`` is the one about to train (copied here)."""
    if args.sample_every is None:
        return None
    make_scorer: ScorerFactory | None = None
    if args.eval_samples and args.eval_ref is not None:
        make_scorer = partial(_inception_scorer, args.eval_ref, args.inception_weights)
    elif args.eval_samples:
        make_scorer = _digits_scorer
    if kind == "upsampler":
        grid, evaluation = _upsampler_inputs(dataset, flags["small_size"], args)
    else:
        grid, evaluation = _model_inputs(num_classes, args)
    diffusion, base = sampling_chain(flags, args.sample_sampler, args.sample_steps, None, None)
    make_stage = partial(
        sampling_stage,
        kind=kind,
        flags=flags,
        sampler=args.sample_sampler,
        diffusion=diffusion,
        base=base,
        precision=config.precision,
    )
    monitor_config = MonitorConfig(
        every=args.sample_every,
        last_step=config.steps,
        weights=args.sample_weights,
        seed=args.seed,
        batch_size=args.sample_batch_size,
        grid=grid,
        evaluation=evaluation if make_scorer is not None else None,
    )
    return Monitor(monitor_config, network, args.out, make_stage, make_scorer)


def sampling_stage(
    network: torch.nn.Module,
    device: torch.device,
    *,
    kind: str,
    flags: dict,
    sampler: str,
    diffusion: Diffusion,
    base: Diffusion,
    precision: str,
) -> Stage:
    """The stage that samples ``network`` as ``admkit sample`` (``upsample`` for an upsampler)
    would with ``--sampler`` and ``--steps`` alone: no guidance, x̂_0 clipped, η 0 where a sampler
    takes one, in the run's precision."""
    return Stage(
        model_fn=network_fn(
            network, class_conditional=flags["class_cond"], precision=precision, device=device
        ),
        diffusion=diffusion,
        shape=image_shape(kind, flags),
        sampler=sampler,
        options=sampler_options(sampler, base),
        noise_stream=UPSAMPLER_STREAM if kind == "upsampler" else BASE_STREAM,
        takes_low_res=kind == "upsampler",
    )


def _model_inputs(num_classes: int | None, args: argparse.Namespace) -> tuple[SampleSet, SampleSet]:
    """The grid's labels cycle over the classes; the evaluation's are uniform per image."""
    if not num_classes:
        return SampleSet(args.sample_grid), SampleSet(args.eval_samples)
    every_class = list(range(num_classes))
    return (
        SampleSet(
            args.sample_grid, draw_labels(args.sample_grid, num_classes, args.seed, every_class)
        ),
        SampleSet(args.eval_samples, draw_labels(args.eval_samples, num_classes, args.seed)),
    )


def _upsampler_inputs(
    dataset: ImageDataset, small_size: int, args: argparse.Namespace
) -> tuple[SampleSet, SampleSet]:
    """The grid's and the evaluation's inputs: the first training images (unflipped),
    downsampled, with their labels where the data has them."""
    rows = min(max(args.sample_grid, args.eval_samples), len(dataset))
    low_res, labels = [], []
    for start in range(0, rows, LOW_RES_CHUNK):
        items = [dataset.load(i) for i in range(start, min(start + LOW_RES_CHUNK, rows))]
        images = torch.stack([image for image, _ in items])
        low_res.append(quantize(make_low_res(images, small_size)).numpy())
        labels += [label for _, label in items]
    low_res_array = np.concatenate(low_res)

    def labels_of(num_samples: int) -> torch.Tensor | None:
        if dataset.num_classes == 0:
            return None
        return torch.tensor([labels[i % rows] for i in range(num_samples)], dtype=torch.long)

    grid = SampleSet(args.sample_grid, labels_of(args.sample_grid), low_res_array)
    evaluation = SampleSet(args.eval_samples, labels_of(args.eval_samples), low_res_array)
    return grid, evaluation


def _inception_scorer(
    reference: str, weights: str | None, run_dir: Path, device: torch.device
) -> quality.Scorer:
    del run_dir  # the reference's features are not kept between runs
    return quality.InceptionScorer(reference, weights, device)


def _digits_scorer(run_dir: Path, device: torch.device) -> quality.Scorer:
    del device  # the judge is small: it runs on the CPU
    # JUDGE_STEPS read here, not bound as a default, so that tests can train a quicker judge.
    return quality.DigitsScorer(quality.digits_judge(run_dir / JUDGE_NAME, quality.JUDGE_STEPS))
