"""``admkit ema``: post-hoc EMA (EDM2), EMA profiles of any length made after training from the
snapshots a run stored with ``--phema``.

    admkit ema RUN --sigma_rel 0.02,0.04,0.08 [--step N] [--out DIR] [--plot]

writes ``phema_<sigma_rel as typed>.safetensors`` per profile into DIR (default: the run's
checkpoint of step N), made from the snapshots up to step N (default: the newest), so that
``admkit sample --model RUN --weights phema_0.04`` (or ``--model DIR/phema_0.04.safetensors``,
or ``--init_from`` the same) uses it. The math is in :mod:`admkit.phema`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from admkit import checkpoint as ckpt
from admkit.cli.options import spellings
from admkit.errors import UserError
from admkit.phema import (
    MAX_SIGMA_REL,
    SNAPSHOT_FORMAT,
    Reconstruction,
    Solver,
    gamma_from_sigma_rel,
    reconstructed_step_weights,
    step_weights,
)

# A profile is refused when ||Σ x_i p_i - p_r|| / ||p_r|| exceeds this. The weights' error is at
# most that residual times the parameters' spread within the profile (admkit.phema), and
# neighbouring profiles of a fine sweep (sigma_rel 0.04 and 0.05) are 18% apart in that norm, so
# below 5% a reconstruction stays much closer to its own target than to its neighbours.
MAX_RESIDUAL = 0.05
# Unit roundoff of the snapshots' storage types: rounding that the coefficients can amplify.
UNIT_ROUNDOFF = {"F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
# Warn when it may reach this fraction of the weights (bf16 weights themselves round at 0.4%).
MAX_ROUNDING = 1e-2
PLOT_NAME = "phema_profiles.png"
PLOT_POINTS = 2000  # longer runs are drawn as the mean weight per step over bins of steps


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Post-hoc EMA (EDM2): make EMA profiles of any relative width sigma_rel "
        "from the snapshots of a run trained with --phema, as weights files "
        "phema_<sigma_rel>.safetensors.",
    )
    parser.add_argument("run_dir", metavar="RUN", help="run directory trained with --phema")
    parser.add_argument(
        *spellings("sigma_rel"),
        required=True,
        metavar="S1,S2",
        help="comma list of relative widths to make, e.g. 0.02,0.04,0.08",
    )
    parser.add_argument(
        "--step",
        type=int,
        default=None,
        metavar="N",
        help="average the training up to this snapshot step (default: the newest snapshot)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for the files (default: RUN/checkpoints/step_N, where --weights finds "
        "them); elsewhere the run's config.json is copied beside them",
    )
    parser.add_argument(
        "--plot",
        action="store_true",
        help=f"also draw DIR/{PLOT_NAME}: each profile's weight per training step, "
        "reconstructed and exact",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    parser.set_defaults(run=run)
    return parser


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot: the step it was taken at, and its profiles' labels and γ."""

    path: Path
    step: int
    labels: tuple[str, ...]
    gammas: tuple[float, ...]
    roundoff: float


def parse_sigma_rels(text: str) -> dict[str, float]:
    """``--sigma_rel`` as typed (labels) -> values; a label that is no positive number is a
    user error."""
    parsed: dict[str, float] = {}
    for label in (part.strip() for part in text.split(",")):
        try:
            value = float(label)
        except ValueError:
            value = math.nan
        if not value > 0.0 or math.isinf(value):
            raise UserError(
                f"--sigma_rel {label!r} is not a positive number; give a comma list such as "
                "0.02,0.04,0.08"
            )
        if value in parsed.values():
            raise UserError(f"--sigma_rel {text} lists {value} twice")
        parsed[label] = value
    return parsed


def read_snapshots(run_dir: Path) -> list[Snapshot]:
    """The run's snapshots, oldest first, with what their metadata says."""
    snapshots = []
    for path in ckpt.list_snapshots(run_dir):
        try:
            with safetensors.safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                first = next(iter(file.keys()), None)
                dtype = file.get_slice(first).get_dtype() if first is not None else "F32"
            labels = tuple(json.loads(metadata["sigma_rel"]))
            gammas = tuple(float(g) for g in json.loads(metadata["gamma"]))
            step = int(metadata["step"])
        except Exception as error:  # safetensors and json raise their own types
            raise UserError(f"cannot read snapshot {path} ({error}); remove the file") from None
        if metadata.get("format") != SNAPSHOT_FORMAT or step != ckpt.snapshot_step(path):
            raise UserError(f"{path} is not a snapshot of this run; remove the file")
        roundoff = UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["BF16"])
        snapshots.append(Snapshot(path, step, labels, gammas, roundoff))
    return snapshots


def _shortened(steps: list[int]) -> str:
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:3]))}, ..., {steps[-2]}, {steps[-1]} ({len(steps)} in all)"


def expressible(solver: Solver, step: int) -> str:
    """The sigma_rel ranges whose residual stays within MAX_RESIDUAL at ``step``, as text."""
    grid = np.geomspace(1e-3, MAX_SIGMA_REL * (1.0 - 1e-9), 400)
    good = [solver.solve(step, gamma_from_sigma_rel(s)).residual <= MAX_RESIDUAL for s in grid]
    ranges, start = [], None
    for index, ok in enumerate([*good, False]):
        if ok and start is None:
            start = index
        elif not ok and start is not None:
            low, high = grid[start], grid[index - 1]
            # Three significant digits, rounded inwards so that the range holds.
            digits = 2 - math.floor(math.log10(low))
            low = math.ceil(low * 10**digits) / 10**digits
            digits = 2 - math.floor(math.log10(high))
            high = math.floor(high * 10**digits) / 10**digits
            ranges.append(f"{low:g} to {high:g}")
            start = None
    return " and ".join(ranges) if ranges else "none"


def output_folder(args: argparse.Namespace, run_dir: Path, step: int) -> Path:
    """Where the files go; a folder outside the run gets the run's config.json."""
    if args.out is None:
        folder = run_dir / ckpt.CHECKPOINTS / f"step_{step:06d}"
        if folder not in ckpt.list_checkpoints(run_dir):
            raise UserError(
                f"{run_dir} has no checkpoint at step {step} to put the profiles in (--keep "
                "removed it, or it was not a save step); pass --out DIR"
            )
        return folder
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; give a folder")
    if ckpt.is_checkpoint_folder(folder) and ckpt.checkpoint_step(folder) != step:
        raise UserError(
            f"--out {folder} is the checkpoint of step {ckpt.checkpoint_step(folder)}, but the "
            f"profiles are made for step {step}; leave --out out, or choose a folder outside "
            "the run's checkpoints"
        )
    described = ckpt.config_dir(folder / "phema.safetensors")
    if described is None:
        folder.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(folder / ckpt.CONFIG_NAME, (run_dir / ckpt.CONFIG_NAME).read_text())
        return folder
    # The sampling commands read the model from this config.json: it must be this run's.
    theirs = {k: v for k, v in ckpt.read_config(described).items() if k != "train"}
    ours = {k: v for k, v in ckpt.read_config(run_dir).items() if k != "train"}
    if theirs != ours:
        raise UserError(
            f"--out {folder} belongs to another model ({described / ckpt.CONFIG_NAME} differs "
            f"from {run_dir}'s); choose another --out"
        )
    return folder


def reconstruct(
    snapshots: list[Snapshot],
    targets: dict[str, Reconstruction],
    reference: dict[str, torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """Σ x_i θ̂_i per target, accumulated in float64 one tensor at a time (so memory stays at a
    few tensors, whatever the number of snapshots); buffers come from ``reference``."""
    profiles = [(s, label) for s in snapshots for label in s.labels]
    names = None
    results: dict[str, dict[str, torch.Tensor]] = {label: {} for label in targets}
    with ExitStack() as stack:
        files = {
            s.path: stack.enter_context(safetensors.safe_open(s.path, "pt")) for s in snapshots
        }
        for snapshot in snapshots:
            keys = set(files[snapshot.path].keys())
            for label in snapshot.labels:
                held = {key.split("/", 1)[1] for key in keys if key.startswith(f"{label}/")}
                names = held if names is None else names
                if held != names or not held <= reference.keys():
                    raise UserError(
                        f"snapshot {snapshot.path} holds other parameters than the run's model; "
                        "remove the snapshots the run did not write"
                    )
        for name, value in reference.items():
            if name not in names:  # a buffer: the averages are of the parameters only
                for label in targets:
                    results[label][name] = value
                continue
            sums = {label: torch.zeros(value.shape, dtype=torch.float64) for label in targets}
            for index, (snapshot, label) in enumerate(profiles):
                theta = files[snapshot.path].get_tensor(f"{label}/{name}").double()
                for target, solved in targets.items():
                    sums[target].add_(theta, alpha=float(solved.coefficients[index]))
            for label in targets:
                results[label][name] = sums[label].to(value.dtype)
    return results


def plot_profiles(
    path: Path, snapshots: list[Snapshot], targets: dict[str, Reconstruction], overwrite: bool
) -> None:
    """Each profile's weight per training step: reconstructed from the snapshots, and exact."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    t = [s.step for s in snapshots for _ in s.labels]
    gammas = [g for s in snapshots for g in s.gammas]
    figure = Figure(figsize=(7, 2.2 * len(targets) + 0.6), dpi=100)
    FigureCanvasAgg(figure)
    for row, (label, solved) in enumerate(targets.items()):
        made = reconstructed_step_weights(t, gammas, solved.coefficients, solved.t)
        exact = step_weights(solved.t, solved.gamma)
        size = math.ceil(solved.t / PLOT_POINTS)
        starts = np.arange(0, solved.t, size)
        steps = starts + 1 + (np.minimum(starts + size, solved.t) - starts - 1) / 2
        counts = np.diff(np.append(starts, solved.t))
        axes = figure.add_subplot(len(targets), 1, row + 1)
        axes.plot(
            steps, np.add.reduceat(exact, starts) / counts, label="exact profile", linewidth=2.5
        )
        axes.plot(steps, np.add.reduceat(made, starts) / counts, label="reconstructed", linewidth=1)
        axes.set_title(f"sigma_rel {label}: relative residual {solved.residual:.2e}", fontsize=9)
        axes.set_ylabel("weight per step")
        axes.legend(fontsize="small")
    axes.set_xlabel("training step")
    figure.tight_layout()
    with ckpt.atomic_path(path, overwrite=overwrite) as temporary:
        figure.savefig(temporary)


def run(args: argparse.Namespace) -> int:
    sigma_rels = parse_sigma_rels(args.sigma_rel)
    run_dir = Path(args.run_dir)
    ckpt.read_config(run_dir)  # a clear error for anything that is not a run
    snapshots = read_snapshots(run_dir)
    if not snapshots:
        raise UserError(
            f"{run_dir} has no post-hoc EMA snapshots; train it with --phema 0.05,0.10 "
            "(and --snapshot_interval N) to store them"
        )
    steps = [s.step for s in snapshots]
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        raise UserError(
            f"--step {step} has no snapshot; {run_dir} has snapshots at steps {_shortened(steps)}"
        )
    used = [s for s in snapshots if s.step <= step]
    solver = Solver([s.step for s in used for _ in s.labels], [g for s in used for g in s.gammas])
    targets = {}
    for label, value in sigma_rels.items():
        solved = None
        if value < MAX_SIGMA_REL:
            solved = solver.solve(step, gamma_from_sigma_rel(value))
        if solved is None or solved.residual > MAX_RESIDUAL:
            why = (
                f"relative residual {solved.residual:.3g} > {MAX_RESIDUAL}"
                if solved is not None
                else f"power-function EMAs reach {MAX_SIGMA_REL:.4f}"
            )
            raise UserError(
                f"--sigma_rel {label} cannot be made from the snapshots up to step {step} "
                f"({why}); they can make sigma_rel {expressible(solver, step)}"
            )
        targets[label] = solved

    folder = output_folder(args, run_dir, step)
    tracked_here = []
    if ckpt.is_checkpoint_folder(folder) and (folder / ckpt.MANIFEST).exists():
        tracked_here = ckpt.weight_names(folder, added=False)
    paths = {label: folder / f"phema_{label}.safetensors" for label in targets}
    for path in paths.values():
        if path.stem in tracked_here:
            raise UserError(
                f"{folder} holds {path.stem} as the run tracked it; use --weights {path.stem} "
                "(or pass --out DIR to write the reconstruction elsewhere)"
            )
    for path in [*paths.values(), *([folder / PLOT_NAME] if args.plot else [])]:
        if path.exists() and not args.overwrite:
            raise UserError(f"{path} already exists; pass --overwrite to replace it")

    reference_checkpoint = run_dir / ckpt.CHECKPOINTS / f"step_{step:06d}"
    if reference_checkpoint not in ckpt.list_checkpoints(run_dir):
        reference_checkpoint = ckpt.latest_checkpoint(run_dir)
    if reference_checkpoint is None:
        raise UserError(f"{run_dir} has no complete checkpoint yet; train it first")
    reference = ckpt.read_weights(reference_checkpoint, "model")
    states = reconstruct(used, targets, reference)
    profiles = [[s.step, label] for s in used for label in s.labels]
    for label, solved in targets.items():
        metadata = {
            "format": "admkit-phema",
            "sigma_rel": label,
            "gamma": repr(solved.gamma),
            "step": str(step),
            "residual": repr(solved.residual),
            "gain": repr(solved.gain),
            "snapshots": json.dumps([s.step for s in used]),
            "coefficients": json.dumps(
                [[*profile, float(x)] for profile, x in zip(profiles, solved.coefficients)]
            ),
        }
        with ckpt.atomic_path(paths[label], overwrite=args.overwrite) as temporary:
            safetensors.torch.save_file(states[label], temporary, metadata=metadata)
        rounding = solved.gain * max(s.roundoff for s in used)
        if rounding > MAX_ROUNDING:
            print(
                f"admkit ema: warning: sigma_rel {label}: the snapshots' rounding may reach "
                f"{rounding:.1e} of the weights (coefficients of total size {solved.gain:.3g}); "
                "fp32 snapshots (--snapshot_dtype fp32) avoid that",
                file=sys.stderr,
            )
        print(
            f"sigma_rel {label} (gamma {solved.gamma:.3f}): step {step}, relative residual "
            f"{solved.residual:.2e} -> {paths[label]}",
            flush=True,
        )
    if args.plot:
        plot_profiles(folder / PLOT_NAME, used, targets, args.overwrite)
        print(f"profiles drawn in {folder / PLOT_NAME}", flush=True)
    return 0
