"""Samples and metrics during training (``--sample_every N``): a grid drawn from the same noise
every N steps and at the last step, and, with a scorer, its figures in the run's log.

The training loop calls a :class:`Monitor` after every step (``admkit.train.train``'s
``after_step``). At a step where it samples, it loads the weights it was asked for (``model``,
``ema_RATE`` or ``phema_S``) into its own copy of the network, in eval mode and without gradients
(the training model, its autograd graph and its DDP wrapper are never touched), and

1. draws the grid through :func:`admkit.generate.generate`, sharded over the ``torchrun``
   processes as ``admkit sample`` is, and rank 0 writes ``RUN/samples/step_NNNNNN.png``;
2. with an evaluation, draws its images the same way and rank 0 scores them
   (:mod:`admkit.quality`), returning ``{"eval_<metric>": value, ..., "eval_samples": K,
   "eval_seconds": s}``, which the loop appends to ``log.jsonl`` and plots in ``metrics.png``
   (:mod:`admkit.runlog`). A value that is not finite (the judged accuracy of an unconditional
   model) is left out, as JSON has no NaN. ``eval_seconds`` is the whole call on rank 0: the
   grid, the evaluation's images and their scoring.

Same noise every time: image i starts from the x_T of its own generators, seeded by (seed, i,
stream), and gets the same label and low-res input at every step. The grids are a timeline of one
set of starting points, the figures are measured on one set of draws, and a run resumed from a
checkpoint writes the same files as one that never stopped (the first call drops the grids of
steps past the one it resumed from; the loop drops their records).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from admkit import distributed
from admkit.checkpoint import SAMPLES
from admkit.generate import Generated, Stage, generate, save_grid
from admkit.quality import Scorer
from admkit.runlog import EVAL_PREFIX

# (the network to sample, with the weights loaded; its device) -> the stage that samples it
StageFactory = Callable[[torch.nn.Module, torch.device], Stage]
# (the run directory, the device) -> the scorer; called once, on rank 0, at the first evaluation
ScorerFactory = Callable[[Path, torch.device], Scorer]


@dataclass(frozen=True)
class SampleSet:
    """A fixed set of images to draw: ``num_samples`` of them, their labels ``[N]`` int64 (None:
    no labels) and, for an upsampler, its low-res inputs uint8 ``[M, h, w, 3]`` (image i reads
    row i mod M)."""

    num_samples: int
    labels: torch.Tensor | None = None
    low_res: np.ndarray | None = None


@dataclass(frozen=True)
class MonitorConfig:
    """When and what to sample.

    Attributes:
        every: sample after every ``every`` steps, and after ``last_step``.
        last_step: the run's last step (``--steps``).
        weights: which of the run's weights to sample: ``model``, ``ema_RATE`` or ``phema_S``.
        seed: seed of every image's generators.
        batch_size: images per batch on each process.
        grid: the grid's images.
        evaluation: the images to score, or None for grids only.
    """

    every: int
    last_step: int
    weights: str
    seed: int
    batch_size: int
    grid: SampleSet
    evaluation: SampleSet | None = None

    def samples_at(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step


def grid_path(run_dir: str | Path, step: int) -> Path:
    """Where the grid of ``step`` goes: ``RUN/samples/step_NNNNNN.png``."""
    return Path(run_dir) / SAMPLES / f"step_{step:06d}.png"


def drop_grids_after(run_dir: str | Path, step: int) -> None:
    """Remove the grids of steps past ``step`` (and a killed writer's leftovers), so that a run
    resumed from ``step`` reads as one uninterrupted run; it draws them again as it goes."""
    folder = Path(run_dir) / SAMPLES
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        name = path.name
        drawn_later = name.startswith("step_") and name.endswith(".png")
        drawn_later = drawn_later and name[5:-4].isdigit() and int(name[5:-4]) > step
        if drawn_later or name.startswith(".partial-"):
            path.unlink()


class Monitor:
    """The ``after_step`` of a run that samples during training (see the module docstring).

    ``network`` is copied when the monitor is made; ``make_stage`` turns the copy into the stage
    that samples it (its chain, sampler and precision), once; ``make_scorer`` (needed exactly
    when ``config.evaluation`` is set) makes the scorer at the first evaluation, on rank 0.
    """

    def __init__(
        self,
        config: MonitorConfig,
        network: torch.nn.Module,
        run_dir: str | Path,
        make_stage: StageFactory,
        make_scorer: ScorerFactory | None = None,
    ) -> None:
        if (config.evaluation is None) != (make_scorer is None):
            raise ValueError("an evaluation needs a scorer, and a scorer an evaluation")
        self.config = config
        self.run_dir = Path(run_dir)
        self.network = copy.deepcopy(network).eval().requires_grad_(False)
        self.make_stage, self.make_scorer = make_stage, make_scorer
        self.stage: Stage | None = None
        self.scorer: Scorer | None = None
        self.started = False

    def __call__(
        self, step: int, weights: Callable[[str], Mapping[str, torch.Tensor]]
    ) -> dict[str, Any] | None:
        main = distributed.is_main_process()
        if not self.started:
            self.started = True
            if main:
                drop_grids_after(self.run_dir, step - 1)
        if not self.config.samples_at(step):
            return None
        start = time.perf_counter()
        state = weights(self.config.weights)
        device = next(iter(state.values())).device
        self.network.to(device).load_state_dict(state)
        if self.stage is None:
            self.stage = self.make_stage(self.network, device)

        grid = self._draw(self.config.grid, device)
        if main:
            path = grid_path(self.run_dir, step)
            path.parent.mkdir(exist_ok=True)
            save_grid(path, grid.images, overwrite=True)
        evaluation = self.config.evaluation
        if evaluation is None:
            return None
        drawn = self._draw(evaluation, device)
        if not main:
            return None
        if self.scorer is None:
            self.scorer = self.make_scorer(self.run_dir, device)
        scores = self.scorer.score(drawn.images, drawn.labels)
        record = {
            EVAL_PREFIX + name: value for name, value in scores.items() if math.isfinite(value)
        }
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
        record[EVAL_PREFIX + "samples"] = evaluation.num_samples
        record[EVAL_PREFIX + "seconds"] = round(time.perf_counter() - start, 3)
        return record

    def _draw(self, images: SampleSet, device: torch.device) -> Generated:
        """The images of ``images`` on rank 0 (collective: every rank calls it)."""
        with torch.no_grad():
            return generate(
                [self.stage],
                num_samples=images.num_samples,
                batch_size=self.config.batch_size,
                seed=self.config.seed,
                labels=images.labels,
                low_res=images.low_res,
                device=device,
            )
