"""A run's log: the per-interval meter, ``log.jsonl`` and the ``loss.png`` and ``metrics.png``
drawn from it.

A training record holds the step, samples seen, learning rate, the mean of every logged term over
the interval (and per timestep quartile ``q = floor(4 t / T)`` when the loss reports t), the mean
gradient norm, images/s and the number of skipped (non-finite) steps. An evaluation record
(``--sample_every`` with a scorer, admkit.monitor) holds the step and ``eval_``-prefixed values:
the metrics (``eval_fid``, ``eval_precision``...), ``eval_samples`` and ``eval_seconds``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from admkit import checkpoint as ckpt
from admkit import distributed as dist

# Terms of a loss dict that are not logged as values of their own.
RESERVED_TERMS = ("weight", "t", "num_timesteps")
EVAL_PREFIX = "eval_"
# Values of an evaluation record that say what it cost, not what it found: not plotted.
EVAL_COSTS = ("eval_samples", "eval_seconds")


class Meter:
    """Sums of the logged terms over a log interval, overall and per timestep quartile."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # key -> [2, 5]: (sum, count) x (all, q0..q3)
        self.grad_norms: list[float] = []
        self.skipped = 0
        self.steps = 0
        self.start = time.perf_counter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside out of images/s (sampling during training)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - started

    def add(self, terms: Mapping[str, Any]) -> None:
        weight = terms["weight"].float() if "weight" in terms else None
        quartile = None
        if "t" in terms:
            quartile = torch.div(
                4 * terms["t"].long(), terms["num_timesteps"], rounding_mode="floor"
            )
        for key, value in terms.items():
            if key in RESERVED_TERMS:
                continue
            # Logged values carry the importance weights, as guided-diffusion logs them.
            value = value.float() * weight if weight is not None else value.float()
            sums = self.sums.setdefault(key, value.new_zeros(2, 5))
            sums[0, 0] += value.sum()
            sums[1, 0] += value.numel()
            if quartile is not None:
                sums[0, 1:].index_add_(0, quartile, value)
                sums[1, 1:].index_add_(0, quartile, torch.ones_like(value))

    def record(self, step: int, lr: float, batch_size: int) -> dict[str, Any]:
        """The log record: means over the interval and over all processes (collective)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        record: dict[str, Any] = {"step": step, "samples": step * batch_size, "lr": lr}
        keys = sorted(self.sums)
        if keys:
            totals = dist.all_reduce_sum_(torch.stack([self.sums[k] for k in keys])).cpu()
            for key, (sums, counts) in zip(keys, totals):
                record[key] = (sums[0] / counts[0]).item()
                for q in range(4):
                    if counts[q + 1] > 0:
                        record[f"{key}_q{q}"] = (sums[q + 1] / counts[q + 1]).item()
        if self.grad_norms:
            record["grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        record["images_per_s"] = self.steps * batch_size / elapsed
        record["skipped_steps"] = self.skipped
        return record


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl`` (a line cut short by a crash is left out)."""
    path = Path(run_dir) / ckpt.LOG_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_losses(run_dir: str | os.PathLike) -> Path:
    """Draw ``loss.png`` from ``log.jsonl``: the loss, and its timestep quartiles when logged."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_log(run_dir)
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    values = []
    for key in ["loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3"]:
        points = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        if points:
            axes.plot(*zip(*points), label=key, linewidth=1.5 if key == "loss" else 0.8)
            values += [value for _, value in points]
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    if values:
        axes.legend(fontsize="small")
        if min(values) > 0:
            axes.set_yscale("log")
    path = Path(run_dir) / ckpt.PLOT_NAME
    with ckpt.atomic_path(path, overwrite=True) as temporary:
        figure.savefig(temporary)
    return path


def plot_metrics(run_dir: str | os.PathLike) -> Path | None:
    """Draw ``metrics.png`` from the evaluation records of ``log.jsonl``: one panel per metric
    against the step. None (and no file) while the log holds no metric."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = read_log(run_dir)
    names: dict[str, None] = {}  # in order of first appearance
    for record in records:
        names |= dict.fromkeys(
            key for key in record if key.startswith(EVAL_PREFIX) and key not in EVAL_COSTS
        )
    if not names:
        return None
    columns = min(len(names), 3)
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(4 * columns, 3 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for index, name in enumerate(names, 1):
        axes = figure.add_subplot(rows, columns, index)
        points = [(r["step"], r[name]) for r in records if name in r and math.isfinite(r[name])]
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, linewidth=1.2)
        axes.set_title(name.removeprefix(EVAL_PREFIX), fontsize="medium")
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(run_dir) / ckpt.METRICS_PLOT_NAME
    with ckpt.atomic_path(path, overwrite=True) as temporary:
        figure.savefig(temporary)
    return path


def truncate_log(run_dir: Path, last_step: int) -> None:
    """Keep the log records up to the resumed step, so the log reads as one uninterrupted run."""
    path = run_dir / ckpt.LOG_NAME
    if not path.exists():
        return
    kept = [r for r in read_log(run_dir) if r.get("step", 0) <= last_step]
    ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept), overwrite=True)
