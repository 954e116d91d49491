"""``admkit demo``: the paper's idea end to end on the built-in digits, on a laptop CPU.

Stages (each reused when a rerun finds it finished):

1. train a small unconditional diffusion model on the digits' training part (L_hybrid, cosine
   schedule, learned variances — the paper's recipe at toy size);
2. train a noise-aware classifier on noised digits (ADM §4.3);
3. train an independent judge on clean digits (``admkit.judge``);
4. sample 10 digits × ``--per_digit`` per setting: no guidance, classifier guidance at a few
   scales (ADM Alg. 1), autoguidance by the run's half-way checkpoint at two weights, and three
   fast settings with classifier guidance: ancestral sampling respaced to 25 steps, and
   DPM-Solver++ 2M, deterministic and SDE, at 20 logSNR steps (guided through the score);
5. judge every setting against the held-out digits: judged accuracy (share classified as the
   requested digit), Fréchet distance and precision/recall in the judge's features;
6. write ``grid.png`` (a labelled row per setting, column k asks for digit k), ``guidance.png``
   (Fréchet distance, precision and recall against the scale of either guidance), ``loss.png``,
   ``report.md`` and ``report.json``.

``--minutes`` scales the training budget (the defaults fit 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from admkit.checkpoint import (
    atomic_path,
    atomic_write_text,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
)
from admkit.errors import UserError
from admkit.quality import DigitsScorer, digits_judge

IMAGE_SIZE = 16
SEED = 0
# Training steps at --minutes 10, measured to fit the budget on 2 CPU cores (see README).
DIFFUSION_STEPS = 1500
CLASSIFIER_STEPS = 600
JUDGE_STEPS = 400

DIFFUSION_FLAGS = [
    "--image_size", str(IMAGE_SIZE),
    "--num_channels", "32",
    "--num_res_blocks", "2",
    "--channel_mult", "1,2,2",
    "--attention_resolutions", "8,4",
    "--num_head_channels", "32",
    "--learn_sigma", "True",
    "--noise_schedule", "cosine",
    "--resblock_updown", "True",
    "--use_scale_shift_norm", "True",
    "--class_cond", "False",
]  # fmt: skip
CLASSIFIER_FLAGS = [
    "--image_size", str(IMAGE_SIZE),
    "--classifier_width", "32",
    "--classifier_depth", "1",
    "--classifier_attention_resolutions", "4",
    "--classifier_pool", "attention",
    "--classifier_resblock_updown", "True",
    "--classifier_use_scale_shift_norm", "True",
    "--noise_schedule", "cosine",
]  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """One row of the grid: a sampler, its steps, the classifier guidance scale s (0: none)
    and the autoguidance weight w (1: none)."""

    key: str
    title: str
    sampler: str
    steps: int
    scale: float = 0.0
    guide_scale: float = 1.0


SETTINGS = (
    Setting("ddpm100", "DDPM 100, no guidance", "ddpm", 100),
    Setting("ddpm100_s1", "DDPM 100, classifier s=1", "ddpm", 100, 1.0),
    Setting("ddpm100_s3", "DDPM 100, classifier s=3", "ddpm", 100, 3.0),
    Setting("ddpm100_s10", "DDPM 100, classifier s=10", "ddpm", 100, 10.0),
    Setting("ddpm100_w2", "DDPM 100, autoguidance w=2", "ddpm", 100, guide_scale=2.0),
    Setting("ddpm100_w3", "DDPM 100, autoguidance w=3", "ddpm", 100, guide_scale=3.0),
    Setting("ddpm25_s3", "DDPM 25, classifier s=3", "ddpm", 25, 3.0),
    Setting("dpm20_s3", "DPM-Solver++ 2M 20, classifier s=3", "dpm++2m", 20, 3.0),
    Setting("dpmsde20_s3", "DPM-Solver++ 2M SDE 20, classifier s=3", "dpm++2m-sde", 20, 3.0),
)
# Autoguidance's guide: the run's checkpoint at half its training, with these weights.
GUIDE_WEIGHTS = "ema_0.995"


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=__doc__.split("\n\n")[0],
        epilog="Rerunning with the same --out reuses every finished stage.",
    )
    parser.add_argument("--out", default="demo", help="output folder (default: demo/)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="training budget scale: 10 (default) fits 10 minutes on 2 CPU cores",
    )
    parser.add_argument(
        "--per_digit",
        "--per-digit",
        type=int,
        default=20,
        help="samples per digit and setting (default 20: 200 images a setting)",
    )
    parser.add_argument("--batch_size", "--batch-size", type=int, default=100)
    parser.set_defaults(run=run)
    return parser


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _cli(argv: list[str]) -> None:
    from admkit.cli import main

    code = main(argv)
    if code:
        raise UserError(f"demo stage `admkit {' '.join(argv[:1])}` failed (exit code {code})")


def _trained_steps(run_dir: Path) -> int:
    checkpoint = latest_checkpoint(run_dir) if (run_dir / "config.json").exists() else None
    return int(checkpoint.name.split("_")[1]) if checkpoint else 0


def _train(kind: str, run_dir: Path, flags: list[str], steps: int, extra: list[str]) -> None:
    command = "train" if kind == "diffusion" else "train-classifier"
    done = _trained_steps(run_dir)
    if done >= steps:
        _say(f"{kind}: reusing {run_dir} ({done} steps)")
        return
    _say(f"{kind}: training {steps} steps into {run_dir}" + (f" (from {done})" if done else ""))
    argv = [command, "--data", "digits:train", "--out", str(run_dir), *flags, "--steps", str(steps)]
    _cli(argv + ["--save_interval", str(max(1, steps // 4)), "--seed", str(SEED), *extra])


def _judge(out: Path, steps: int) -> DigitsScorer:
    path = out / "judge.pt"
    if path.exists():
        _say(f"judge: reusing {path}")
    else:
        _say(f"judge: training an independent digit classifier on clean digits ({steps} steps)")
    return DigitsScorer(digits_judge(path, steps))


def _sample(out: Path, setting: Setting, per_digit: int, batch_size: int) -> Path:
    path = out / "samples" / f"{setting.key}.npz"
    if path.exists():
        _say(f"sampling {setting.title}: reusing {path}")
        return path
    _say(f"sampling {setting.title}: {10 * per_digit} images")
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["sample", "--model", str(out / "diffusion"), "--out", str(path)]
    argv += ["--num_samples", str(10 * per_digit), "--batch_size", str(batch_size)]
    argv += ["--sampler", setting.sampler, "--steps", str(setting.steps), "--seed", str(SEED)]
    if setting.scale > 0:
        for digit in range(10):
            argv += ["--class_label", str(digit)]
        argv += ["--classifier", str(out / "classifier")]
        argv += ["--classifier_scale", str(setting.scale)]
    if setting.guide_scale != 1:
        argv += ["--guide_model", str(_guide(out)), "--guide_weights", GUIDE_WEIGHTS]
        argv += ["--guide_scale", str(setting.guide_scale)]
    _cli(argv)
    return path


def _guide(out: Path) -> Path:
    """The guide of autoguidance: the diffusion run's checkpoint nearest half its training, a
    weaker version of the final model made by the same training."""
    checkpoints = list_checkpoints(out / "diffusion")
    half = checkpoint_step(checkpoints[-1]) / 2
    return min(checkpoints, key=lambda checkpoint: abs(checkpoint_step(checkpoint) - half))


def _score(scorer: DigitsScorer, path: Path) -> dict:
    with np.load(path) as archive:
        images = archive["arr_0"]
    # Image i asks for digit i mod 10 (unguided samples ask for nothing: their accuracy is the
    # share that happens to match, about chance).
    labels = np.arange(len(images)) % 10
    return {**scorer.score(images, labels), "num_samples": int(len(images))}


def _grid(out: Path, rows: list[tuple[str, np.ndarray]], cell: int = 40) -> Path:
    """One row per setting: its first sample of each digit 0..9, enlarged, with a label."""
    label_width, pad = 230, 2
    width = label_width + 10 * (cell + pad)
    canvas = Image.new("RGB", (width, 24 + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for digit in range(10):
        draw.text((label_width + digit * (cell + pad) + cell // 2 - 3, 6), str(digit), fill="black")
    for row, (title, images) in enumerate(rows):
        top = 24 + row * (cell + pad)
        draw.text((4, top + cell // 2 - 6), title, fill="black")
        for digit in range(10):
            tile = Image.fromarray(images[digit]).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_width + digit * (cell + pad), top))
    path = out / "grid.png"
    with atomic_path(path, overwrite=True) as temporary:
        canvas.save(temporary, format="PNG")
    return path


def _guidance_figure(out: Path, results: list[dict]) -> Path:
    """Fréchet distance, precision and recall against the guidance scale, DDPM 100: classifier
    guidance (s = 0 is no guidance) and autoguidance (w = 1 is no guidance)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ddpm100 = [r for r in results if r["sampler"] == "ddpm" and r["steps"] == 100]
    curves = {
        "classifier guidance (s)": [
            (r["classifier_scale"], r) for r in ddpm100 if r["guide_scale"] == 1
        ],
        "autoguidance (w)": [(r["guide_scale"], r) for r in ddpm100 if r["classifier_scale"] == 0],
    }
    figure = Figure(figsize=(12, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    names = {"frechet_distance": "Fréchet distance", "precision": "precision", "recall": "recall"}
    for panel, (metric, name) in zip(figure.subplots(1, 3), names.items()):
        for label, points in curves.items():
            points = sorted(points, key=lambda point: point[0])
            panel.plot([x for x, _ in points], [r[metric] for _, r in points], marker="o",
                       label=label)  # fmt: skip
        panel.set_xlabel("guidance scale")
        panel.set_ylabel(name)
        panel.set_xscale("symlog", linthresh=1.0)
        scales = sorted({x for points in curves.values() for x, _ in points})
        panel.set_xticks(scales, [f"{x:g}" for x in scales])
        panel.minorticks_off()
    figure.axes[0].legend(fontsize="small")
    path = out / "guidance.png"
    with atomic_path(path, overwrite=True) as temporary:
        figure.savefig(temporary, format="png")
    return path


def _report(out: Path, results: list[dict], timings: dict) -> None:
    atomic_write_text(
        out / "report.json",
        json.dumps({"settings": results, "seconds": timings}, indent=2) + "\n",
        overwrite=True,
    )
    lines = [
        "# admkit demo report",
        "",
        "Digits 16×16; an unconditional diffusion model guided by a noise-aware classifier",
        "(classifier s), or by an earlier checkpoint of its own training (autoguidance w).",
        "Judged accuracy: share of samples an independent judge classifies as the requested",
        "digit (chance is 10%; autoguidance asks for no digit). Fréchet distance, precision and",
        "recall: in the judge's features, against the 360 held-out real digits. Network evals:",
        "passes of a diffusion network per image (the guide's too; classifier gradients aside).",
        "",
        "| setting | judged accuracy | Fréchet distance | precision | recall | network evals "
        "| seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['title']} | {r['judged_accuracy']:.1%} | {r['frechet_distance']:.2f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['network_evals']} | "
            f"{r['seconds'] if r['seconds'] is not None else 'reused'} |"
        )
    lines += [
        "",
        "![guidance scale against Fréchet distance, precision and recall](guidance.png)",
        "",
        f"Stage times of this run (s; a reused stage takes ~0): {json.dumps(timings)}",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines), overwrite=True)


def run(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise UserError(f"--minutes must be positive, got {args.minutes}")
    if args.per_digit < 1:
        raise UserError(f"--per_digit must be at least 1, got {args.per_digit}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if out.exists() and any(out.iterdir()) and not (out / "demo.json").exists():
        raise UserError(f"--out {out} holds other files; choose an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo.json", json.dumps({"image_size": IMAGE_SIZE}), overwrite=True)
    scale = args.minutes / 10.0
    timings: dict[str, float] = {}
    start = time.perf_counter()

    _train(
        "diffusion",
        out / "diffusion",
        DIFFUSION_FLAGS,
        max(10, round(DIFFUSION_STEPS * scale)),
        ["--batch_size", "64", "--lr", "1e-3", "--ema_rate", "0.995", "--log_interval", "25"],
    )
    timings["train_diffusion"] = round(time.perf_counter() - start, 1)
    _train(
        "classifier",
        out / "classifier",
        CLASSIFIER_FLAGS,
        max(10, round(CLASSIFIER_STEPS * scale)),
        ["--batch_size", "64", "--lr", "1e-3", "--log_interval", "25"],
    )
    timings["train_classifier"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    if (out / "diffusion" / "loss.png").exists():
        shutil.copyfile(out / "diffusion" / "loss.png", out / "loss.png")

    scorer = _judge(out, max(50, round(JUDGE_STEPS * min(scale, 1.0))))
    timings["judge"] = round(time.perf_counter() - start - sum(timings.values()), 1)

    results, rows = [], []
    for setting in SETTINGS:
        began = time.perf_counter()
        reused = (out / "samples" / f"{setting.key}.npz").exists()
        path = _sample(out, setting, args.per_digit, args.batch_size)
        seconds = None if reused else round(time.perf_counter() - began, 1)
        scores = _score(scorer, path)
        results.append(
            {"key": setting.key, "title": setting.title, "sampler": setting.sampler,
             "steps": setting.steps, "classifier_scale": setting.scale,
             "guide_scale": setting.guide_scale,
             "network_evals": setting.steps * (2 if setting.guide_scale != 1 else 1),
             "classifier_gradients": setting.steps if setting.scale > 0 else 0,
             "seconds": seconds, **scores}
        )  # fmt: skip
        with np.load(path) as archive:
            rows.append((setting.title, archive["arr_0"][:10]))
        _say(
            f"  judged accuracy {scores['judged_accuracy']:.1%}, "
            f"Fréchet distance {scores['frechet_distance']:.2f}, "
            f"precision {scores['precision']:.3f}, recall {scores['recall']:.3f}"
        )
    timings["sampling"] = round(time.perf_counter() - start - sum(timings.values()), 1)
    timings["total"] = round(time.perf_counter() - start, 1)
    grid = _grid(out, rows)
    figure = _guidance_figure(out, results)
    _report(out, results, timings)
    _say(f"wrote {grid}, {figure}, {out / 'loss.png'}, {out / 'report.md'}, {out / 'report.json'}")
    _say(f"done in {timings['total']:.0f} s")
    return 0
