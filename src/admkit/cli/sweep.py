"""``admkit sweep``: sample and score a grid of sampling settings, and draw the trade-off curves.

    admkit sweep --model RUN --out sweeps/ag --guide_model RUN/checkpoints/step_000375 \\
        --guide_scale 1,1.5,2,2.5,3 --sampler ddpm --steps 100 --num_samples 500

Every sampling option of ``admkit sample`` is accepted; one given as a comma list is an axis
(``--guidance_interval`` takes ``;`` between intervals: "100,800;200,600"). Each cell draws the
same images' noise (per-image seeds), is scored against ``--ref REF.npz`` with the evaluator or
by the digits judge (``--judge digits``, the default for a model trained on the built-in digits),
and is kept in ``DIR/cells/`` as it finishes: the same command continues an interrupted sweep.
Under ``torchrun`` the cells are dealt out to the processes. See ``admkit.sweep`` for the files.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from admkit import distributed
from admkit.checkpoint import atomic_write_text, config_dir, read_config
from admkit.cli.models import LoadedModel, load_model
from admkit.cli.options import add_model_options, spellings
from admkit.cli.sampling import (
    BaseModels,
    base_stage,
    common_num_classes,
    load_base_models,
    requested_labels,
)
from admkit.cli.sampling_options import (
    add_guidance_options,
    add_sampling_options,
    check_guidance_options,
    check_sampling_options,
    choose_sampler,
)
from admkit.data import DIGITS_SPECS
from admkit.errors import UserError
from admkit.generate import draw_labels, generate, save_grid
from admkit.partial_samples import file_identity, weights_identity
from admkit.presets import get_preset
from admkit.quality import JUDGES, DigitsScorer, InceptionScorer, Scorer, digits_judge
from admkit.sweep import CELLS, Axis, CellStore, cell_key, grid, parse_axis, write_results

# The options that may be axes: every sampling option whose value changes the images.
AXIS_OPTIONS = (
    "model",
    "weights",
    "sampler",
    "steps",
    "step_spacing",
    "eta",
    "s_churn",
    "classifier_scale",
    "cfg_scale",
    "guide_model",
    "guide_weights",
    "guide_scale",
    "guidance_interval",
    "dynamic_threshold",
    "clip_denoised",
    "precision",
    "seed",
)
DEFAULT_NUM_SAMPLES = 500
SWEEP_FILE = "sweep.json"
GRID_IMAGES = 64  # the first images of each cell, kept as a picture
GRIDS = "grids"


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="Any sampling option given as a comma list is an axis of the grid, e.g. "
        "--guide_scale 1,1.5,2,3 --sampler ddpm,dpm++2m-sde; --guidance_interval takes ';' "
        "between intervals. Rerun the same command to continue an interrupted sweep.",
    )
    add_sampling_options(parser, outputs=False)
    parser.add_argument("--out", required=True, metavar="DIR", help="sweep folder")
    add_guidance_options(parser)
    group = parser.add_argument_group("scoring")
    group.add_argument(
        "--ref",
        default=None,
        metavar="REF.npz",
        help="reference batch: score each cell with the evaluator (IS, FID, sFID, precision, "
        "recall)",
    )
    group.add_argument(
        "--judge",
        choices=JUDGES,
        default=None,
        help="score with the digits judge (Fréchet distance, precision, recall, judged "
        "accuracy in its features); the default for a model trained on the built-in digits",
    )
    group.add_argument(
        *spellings("inception_weights"),
        default=None,
        metavar="PATH",
        help="FID Inception weights for --ref (default: $ADMKIT_INCEPTION, the torch hub cache)",
    )
    add_model_options(parser, "model", "classifier")
    for action in parser._actions:
        if action.dest in AXIS_OPTIONS:
            # Parsed here as text and split into values by the sweep; the type converts each.
            action.convert = action.type
            action.type = None
            action.help = (action.help or "") + " (a comma list is an axis)"
        if action.dest == "overwrite":
            action.help = "discard the finished cells of DIR and start over"
        if action.dest == "num_samples":
            action.help = f"images per cell (default {DEFAULT_NUM_SAMPLES})"
    axis_actions = [action for action in parser._actions if action.dest in AXIS_OPTIONS]
    parser.set_defaults(
        run=run,
        axis_types={a.dest: getattr(a, "convert", None) or str for a in axis_actions},
        axis_flags={a.dest: tuple(a.option_strings) for a in axis_actions},
    )
    return parser


# ---------------------------------------------------------------------------------------------
# The grid


def parse_axes(args: argparse.Namespace) -> list[Axis]:
    """Every axis option that was given, with its values (one or several), in the order of the
    command line."""
    axes = []
    for name in AXIS_OPTIONS:
        text = getattr(args, name)
        if text is not None:
            separator = ";" if name == "guidance_interval" else ","
            axes.append(parse_axis(name, str(text), args.axis_types[name], separator))
    return sorted(axes, key=lambda axis: _position(args, axis.name))


def _position(args: argparse.Namespace, name: str) -> int:
    """Where option ``name`` first appears in the command line (after all others if not)."""
    flags = args.axis_flags[name]
    for index, token in enumerate(getattr(args, "argv", [])):
        if token in flags or token.split("=", 1)[0] in flags:
            return index
    return len(getattr(args, "argv", []))


def cell_options(
    args: argparse.Namespace, axes: list[Axis], cell: dict[str, int]
) -> argparse.Namespace:
    """The options of one cell: the sweep's, with every axis option at the cell's value."""
    values = vars(args).copy()
    for axis in axes:
        values[axis.name] = axis.values[cell[axis.name]]
    return argparse.Namespace(**values)


def describe(axes: list[Axis], cell: dict[str, int]) -> str:
    shown = [a for a in axes if len(a.values) > 1]
    return ", ".join(f"{a.name}={a.labels[cell[a.name]]}" for a in shown) or "the only cell"


def check_cell(options: argparse.Namespace, label: str) -> None:
    """The cheap checks of ``admkit sample``, naming the cell that fails them."""
    try:
        options.sampler = choose_sampler(options)
        check_sampling_options(options, options.sampler)
        check_guidance_options(options)
    except UserError as error:
        raise UserError(f"cell {label}: {error}") from None


class ModelCache:
    """``load_model`` for the sweep: each network (spec, kind, weights, preset) is read once;
    the model options of bare ``.pt`` files are the sweep's own."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loaded: dict[tuple, LoadedModel] = {}

    def __call__(self, spec, kind, options=None, *, weights=None, preset=None) -> LoadedModel:
        key = (str(spec), kind, weights, preset)
        if key not in self.loaded:
            self.loaded[key] = load_model(spec, kind, self.args, weights=weights, preset=preset)
        return self.loaded[key]


def cell_identity(
    options: argparse.Namespace,
    models: BaseModels,
    labels: torch.Tensor | None,
    device: torch.device,
    scoring: dict[str, Any],
) -> dict[str, Any]:
    """Everything that decides a cell's images and their score (not the batch size: images
    depend on (seed, index) alone)."""
    guided = models.guide is not None and options.guide_scale != 1
    classified = models.classifier is not None and models.classifier_scale != 0
    return {
        "model": [weights_identity(options.model, options.weights), options.preset],
        "sampling": {
            name: getattr(options, name)
            for name in (
                "sampler",
                "steps",
                "step_spacing",
                "timestep_respacing",
                "eta",
                "s_churn",
                "clip_denoised",
                "dynamic_threshold",
                "precision",
                "seed",
                "guidance_interval",
                "cfg_scale",
            )
        },  # fmt: skip
        "classifier": [weights_identity(options.classifier), models.classifier_scale]
        if classified
        else None,
        "guide": [weights_identity(options.guide_model, options.guide_weights), options.guide_scale]
        if guided
        else None,
        "labels": None if labels is None else labels.tolist(),
        "num_samples": options.num_samples,
        "device": device.type,
        "scoring": scoring,
    }


# ---------------------------------------------------------------------------------------------
# Scoring


def is_digits_model(spec: str) -> bool:
    """Whether ``spec`` is a run (or weights of one) trained on the built-in digits."""
    folder = config_dir(spec)
    if folder is None:
        return False
    source = read_config(folder).get("data", {}).get("source")
    return source in DIGITS_SPECS


def choose_scoring(args: argparse.Namespace, models: list[str]) -> dict[str, Any]:
    """Settle ``--ref`` / ``--judge`` before any work (the digits judge by default for models
    trained on the built-in digits); returns what identifies the scoring."""
    if args.ref is not None and args.judge is not None:
        raise UserError("give --ref REF.npz (the evaluator) or --judge digits, not both")
    if args.ref is not None:
        if not Path(args.ref).is_file():
            raise UserError(f"--ref {args.ref} does not exist; give a reference batch (.npz)")
        return {"ref": file_identity(args.ref), "inception_weights": args.inception_weights}
    if args.judge is None:
        if not all(is_digits_model(spec) for spec in models):
            raise UserError(
                "say how to score the cells: --ref REF.npz (Inception metrics; `admkit "
                "ref-batch` makes one) or --judge digits (for models of the built-in digits)"
            )
        args.judge = "digits"
    return {"judge": args.judge}


def make_scorer(args: argparse.Namespace, device: torch.device) -> Scorer:
    """The scorer, built on every rank; the digits judge is trained once, by rank 0."""
    if args.ref is not None:
        return InceptionScorer(args.ref, args.inception_weights, device)
    path = Path(args.out) / "judge.pt"
    if distributed.is_main_process():
        digits_judge(path)
    distributed.barrier()
    return DigitsScorer(digits_judge(path))


# ---------------------------------------------------------------------------------------------
# One cell


def network_evals(options: argparse.Namespace, models: BaseModels, model_evals: int) -> int:
    """Network passes per image: the model, plus the guide, plus the null-label branch of CFG
    (classifier gradients, a smaller network's forward and backward, are not counted)."""
    passes = 1
    passes += models.guide is not None and options.guide_scale != 1
    passes += options.cfg_scale is not None
    return passes * model_evals


def run_cell(
    options: argparse.Namespace,
    models: BaseModels,
    preset,
    device: torch.device,
    labels: torch.Tensor | None,
    scorer: Scorer,
    description: str,
) -> tuple[dict[str, Any], np.ndarray]:
    """Sample one cell in this process and score it: (its record, its images)."""
    began = time.perf_counter()
    stage = base_stage(options, models, preset, device)
    result = generate(
        [stage],
        num_samples=options.num_samples,
        batch_size=options.batch_size,
        seed=options.seed,
        labels=labels,
        device=device,
        progress=True,
        shard=False,
        description=description,
        step_progress=False,
    )
    metrics = scorer.score(result.images, result.labels)
    model_evals = result.num_model_evals[0]
    record = {
        "metrics": metrics,
        "num_samples": options.num_samples,
        "model_evals": model_evals,
        "network_evals": network_evals(options, models, model_evals),
        "seconds": round(time.perf_counter() - began, 2),
    }
    return record, result.images


def command_line(args: argparse.Namespace) -> str:
    argv = getattr(args, "argv", None)
    return "admkit " + shlex.join(argv) if argv else "admkit sweep"


def summary(axes: list[Axis], records: list[dict[str, Any]], metrics: tuple[str, ...]) -> str:
    """The results as a plain-text table for the terminal."""
    shown = [a for a in axes if len(a.values) > 1]
    header = [a.name for a in shown] + list(metrics)
    rows = [
        [r["settings"][a.name] for a in shown] + [f"{r['metrics'][m]:.4g}" for m in metrics]
        for r in records
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    return "\n".join(
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *rows]
    )


# ---------------------------------------------------------------------------------------------


def prepare_out(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the sweep")
    if out.exists() and any(out.iterdir()) and not (out / SWEEP_FILE).exists():
        raise UserError(f"--out {out} holds other files; choose an empty or new folder")


def run(args: argparse.Namespace) -> int:
    prepare_out(args)
    args.num_samples = args.num_samples or DEFAULT_NUM_SAMPLES
    if args.num_samples < 4:
        raise UserError(f"--num_samples {args.num_samples}: precision and recall need 4 or more")
    axes = parse_axes(args)
    varying = [axis for axis in axes if len(axis.values) > 1]
    fixed = {axis.name: axis.labels[0] for axis in axes if len(axis.values) == 1}
    cells = grid(varying)
    options = [cell_options(args, axes, {**dict.fromkeys(fixed, 0), **c}) for c in cells]
    for cell_option, cell in zip(options, cells):
        check_cell(cell_option, describe(varying, cell))
    scoring = choose_scoring(args, sorted({o.model for o in options}))
    preset = get_preset(args.preset) if args.preset else None

    device = distributed.setup(distributed.select_device(args.device))
    main = distributed.is_main_process()
    try:
        # Every cell's networks, loaded and checked against each other before any sampling.
        cache = ModelCache(args)
        models = [load_base_models(o, preset, load=cache) for o in options]
        num_classes = common_num_classes(list(cache.loaded.values()))
        names = next((m.class_names for m in cache.loaded.values() if m.class_names), None)
        requested = requested_labels(args, num_classes, names)
        labels = [
            None if num_classes is None else draw_labels(o.num_samples, num_classes, o.seed,
                                                         requested)
            for o in options
        ]  # fmt: skip
        out = Path(args.out)
        if main:
            (out / GRIDS).mkdir(parents=True, exist_ok=True)
            if args.overwrite:
                for stale in (out / CELLS).glob("*.json"):
                    stale.unlink()
            atomic_write_text(out / SWEEP_FILE, '{"format": "admkit-sweep"}\n', overwrite=True)
        distributed.barrier()
        scorer = make_scorer(args, device)
        store = CellStore(out)
        keys = [
            cell_key(cell_identity(o, m, y, device, scoring))
            for o, m, y in zip(options, models, labels)
        ]
        # Cells that differ only in what they do not use (a guide at scale 1) share a key.
        first = {key: index for index, key in reversed(list(enumerate(keys)))}
        pending = [i for i, key in enumerate(keys) if first[key] == i and store.get(key) is None]
        done = sum(store.get(key) is not None for key in first)
        if main and done:
            print(
                f"admkit sweep: {done} of {len(first)} cells are done in {store.folder}; "
                f"running the other {len(pending)}",
                file=sys.stderr,
            )
        try:
            for index in pending[distributed.rank() :: distributed.world_size()]:
                description = f"cell {index + 1}/{len(cells)} ({describe(varying, cells[index])})"
                record, images = run_cell(
                    options[index], models[index], preset, device, labels[index], scorer,
                    description,
                )  # fmt: skip
                save_grid(out / GRIDS / f"{keys[index]}.png", images[:GRID_IMAGES],
                          overwrite=True)  # fmt: skip
                store.put(keys[index], record)
        except KeyboardInterrupt:
            # tqdm.write: on a line of its own, not after the cell's progress bar.
            tqdm.write(
                f"admkit sweep: the finished cells are kept in {store.folder}; rerun the same "
                "command to continue",
                file=sys.stderr,
            )
            raise
        distributed.barrier()
        if main:
            records = [
                {**store.get(key), "settings": {a.name: a.labels[c[a.name]] for a in varying}}
                for key, c in zip(keys, cells)
            ]
            plots = write_results(out, varying, records, scorer.metrics, fixed, command_line(args))
            print(summary(varying, records, scorer.metrics))
            print(f"wrote {out / 'results.csv'}, results.json, report.md and {len(plots)} plots")
    finally:
        distributed.teardown()
    return 0
