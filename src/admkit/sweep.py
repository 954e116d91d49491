"""A sweep: a grid of sampling settings, each cell sampled and scored, then tabulated and plotted.

An *axis* is a sampling option with several values; the grid is the cross product of the axes,
in the order they are given. Each finished cell is kept as ``DIR/cells/<key>.json``, where the
key is a hash of everything that decides its images and their score (settings, weights files,
number of samples, seed, scorer), so an interrupted sweep continues where it stopped, a grown
grid reuses the cells it already has, and a changed model or reference starts afresh.

What the sweep writes into ``DIR``:

* ``results.csv``: one row per cell, the axes' values as typed, then one column per metric
  (named as ``admkit evaluate --json`` or the digits judge name them), then ``num_samples``,
  ``model_evals`` (sampler steps per image), ``network_evals`` (network passes per image, guide
  and classifier-free branches included) and ``seconds``;
* ``results.json``: the same with the fixed settings and the command;
* ``report.md``: a table and the plots;
* ``plots/``: each metric against each numeric axis (one line per combination of the other
  axes), and precision against recall with the guidance scale marked, as in the paper's Fig. 4–5.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from admkit.checkpoint import atomic_path, atomic_write_text
from admkit.errors import UserError

CELLS = "cells"
PLOTS = "plots"
# The axes a precision-recall curve follows, in order of preference: guidance scales first.
SCALE_AXES = ("guide_scale", "classifier_scale", "cfg_scale")
COST_COLUMNS = ("num_samples", "model_evals", "network_evals", "seconds")


@dataclass(frozen=True)
class Axis:
    """An option and its values: ``labels`` as typed, ``values`` converted."""

    name: str
    labels: tuple[str, ...]
    values: tuple[Any, ...]

    @property
    def numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


def parse_axis(name: str, text: str, convert: Callable[[str], Any], separator: str = ",") -> Axis:
    """The values of option ``name`` from ``text`` ("1,1.5,2"), each converted by ``convert``;
    a bad value is a one-line error naming the option."""
    labels = tuple(part.strip() for part in text.split(separator))
    if any(not label for label in labels):
        raise UserError(f"--{name} {text!r}: an empty value in the list")
    if len(set(labels)) != len(labels):
        raise UserError(f"--{name} {text!r} lists a value twice")
    values = []
    for label in labels:
        try:
            values.append(convert(label))
        except (ValueError, TypeError, UserError) as error:
            raise UserError(f"--{name}: {label!r} is not a valid value ({error})") from None
    return Axis(name, labels, tuple(values))


def grid(axes: Sequence[Axis]) -> list[dict[str, int]]:
    """The cells: for each, the index of its value on every axis; the last axis varies fastest."""
    names = [axis.name for axis in axes]
    ranges = [range(len(axis.values)) for axis in axes]
    return [dict(zip(names, choice)) for choice in itertools.product(*ranges)]


def cell_key(identity: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able description of what decides a cell's result."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class CellStore:
    """Finished cells, one JSON file each under ``DIR/cells``, written atomically."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.folder = Path(out) / CELLS

    def get(self, key: str) -> dict[str, Any] | None:
        """The record of a finished cell, or None (an unreadable file counts as unfinished)."""
        try:
            return json.loads((self.folder / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2, sort_keys=True, allow_nan=True) + "\n"
        atomic_write_text(self.folder / f"{key}.json", text, overwrite=True)


# ---------------------------------------------------------------------------------------------
# Results


def _number(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def results_table(
    axes: Sequence[Axis], records: Sequence[Mapping[str, Any]], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per cell: the axes' values as typed, the metrics, then the costs."""
    rows = []
    for record in records:
        row = {axis.name: record["settings"][axis.name] for axis in axes}
        row |= {name: record["metrics"].get(name, math.nan) for name in metrics}
        row |= {name: record[name] for name in COST_COLUMNS}
        rows.append(row)
    return rows


def write_results(
    out: str | os.PathLike,
    axes: Sequence[Axis],
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    fixed: Mapping[str, Any],
    command: str,
) -> list[Path]:
    """Write results.csv, results.json, report.md and the plots; returns the plot files."""
    out = Path(out)
    rows = results_table(axes, records, metrics)
    columns = [axis.name for axis in axes] + list(metrics) + list(COST_COLUMNS)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_number(row[name]) for name in columns])
    atomic_write_text(out / "results.csv", buffer.getvalue(), overwrite=True)
    document = {
        "command": command,
        "axes": {axis.name: list(axis.labels) for axis in axes},
        "fixed": dict(fixed),
        "metrics": list(metrics),
        "cells": [
            {"settings": record["settings"], "metrics": record["metrics"]}
            | {name: record[name] for name in COST_COLUMNS}
            for record in records
        ],
    }
    # NaN (judged accuracy without labels) is not JSON: it is written as null.
    atomic_write_text(
        out / "results.json",
        json.dumps(_without_nan(document), indent=2) + "\n",
        overwrite=True,
    )
    plots = plot_results(out / PLOTS, axes, rows, metrics)
    atomic_write_text(
        out / "report.md", report(axes, rows, metrics, fixed, command, plots, out), overwrite=True
    )
    return plots


def _without_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    return value


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def report(
    axes: Sequence[Axis],
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    fixed: Mapping[str, Any],
    command: str,
    plots: Sequence[Path],
    out: Path,
) -> str:
    """report.md: the command, the fixed settings, the table and the plots."""
    columns = [axis.name for axis in axes] + list(metrics) + list(COST_COLUMNS)
    lines = ["# admkit sweep", "", "```", command, "```", ""]
    if fixed:
        settings = ", ".join(f"`{key}` = {value}" for key, value in fixed.items())
        lines += [f"Fixed settings: {settings}.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format(row[name]) for name in columns) + " |")
    lines.append("")
    for plot in plots:
        lines += [f"![{plot.stem}]({plot.relative_to(out).as_posix()})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def _groups(
    rows: Sequence[Mapping[str, Any]], axes: Sequence[Axis], along: Axis
) -> dict[str, list[Mapping[str, Any]]]:
    """The rows split by the values of every other axis with more than one value."""
    others = [a for a in axes if a.name != along.name and len(a.values) > 1]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{a.name}={_short(row[a.name])}" for a in others)
        groups.setdefault(label, []).append(row)
    return groups


def _short(label: str) -> str:
    """A value for a legend: a path (a checkpoint, a weights file) by its last part."""
    return Path(label).name if "/" in label else label


def _value_of(axis: Axis, label: str) -> Any:
    return axis.values[axis.labels.index(label)]


def _figure(columns: int, rows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as temporary:
        figure.savefig(temporary, format="png")
    return path


def plot_results(
    folder: Path,
    axes: Sequence[Axis],
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
) -> list[Path]:
    """One figure per numeric axis (a panel per metric) and the precision-recall figure.

    A weights axis with post-hoc EMA profiles (``phema_0.05``...) is plotted against their
    σ_rel; its other values (``ema_0.999``, ``model``) are drawn as horizontal lines.
    """
    written = []
    shown = [m for m in metrics if any(not _missing(row[m]) for row in rows)]
    for axis in axes:
        abscissa = _abscissa(axis)
        if len(axis.values) < 2 or abscissa is None or not shown:
            continue
        x_label, x_of = abscissa
        figure = _figure(len(shown))
        for panel, metric in zip(figure.subplots(1, len(shown), squeeze=False)[0], shown):
            for label, group in _groups(rows, axes, axis).items():
                valid = [row for row in group if not _missing(row[metric])]
                points = sorted((x_of(row[axis.name]), row[metric]) for row in valid
                                if x_of(row[axis.name]) is not None)  # fmt: skip
                if points:
                    line = panel.plot(*zip(*points), marker="o", label=label or None)[0]
                    _reference_lines(panel, axis, valid, metric, x_of, points, line.get_color())
            panel.set_xlabel(x_label)
            panel.set_ylabel(metric)
        _legend(figure)
        written.append(_save(figure, folder / f"vs_{axis.name}.png"))
    if {"precision", "recall"} <= set(shown):
        written.append(_save(_precision_recall(axes, rows), folder / "precision_recall.png"))
    return written


PHEMA_LABEL = re.compile(r"^phema_(\d*\.?\d+)$")


def _abscissa(axis: Axis) -> tuple[str, Callable[[str], float | None]] | None:
    """(x label, label -> x or None) for an axis that can be plotted along x, or None."""
    if axis.numeric:
        return axis.name, lambda label: _value_of(axis, label)
    sigma = {label: float(m.group(1)) for label in axis.labels if (m := PHEMA_LABEL.match(label))}
    if len(sigma) >= 2:
        return f"sigma_rel of {axis.name} phema_*", sigma.get
    return None


def _reference_lines(panel, axis, rows, metric, x_of, points, color) -> None:
    """Dashed lines for the values of ``axis`` that have no x (classic EMAs beside post-hoc
    ones), where they fall near the curve's range (a far one would flatten the curve)."""
    low, high = min(y for _, y in points), max(y for _, y in points)
    span = max(high - low, 1e-12)
    for row in rows:
        y = row[metric]
        if x_of(row[axis.name]) is None and low - span <= y <= high + span:
            panel.axhline(y, linestyle="--", linewidth=0.8, color=color, alpha=0.6)
            panel.annotate(row[axis.name], (points[0][0], y), fontsize="x-small",
                           xytext=(2, 2), textcoords="offset points")  # fmt: skip


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _legend(figure) -> None:
    """One legend for the figure, below its panels, where it hides no curve."""
    handles, labels = figure.axes[0].get_legend_handles_labels() if figure.axes else ([], [])
    if labels:
        columns = min(len(labels), 3)
        figure.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize="small")


def _precision_recall(axes: Sequence[Axis], rows: Sequence[Mapping[str, Any]]):
    """Precision against recall; a line per group follows the guidance scale, marked."""
    varying = [a for a in axes if len(a.values) > 1]
    along = next((a for name in SCALE_AXES for a in varying if a.name == name), None)
    if along is None:
        along = next((a for a in varying if a.numeric), None)
    figure = _figure(1)
    panel = figure.subplots()
    groups = _groups(rows, axes, along) if along is not None else {"": list(rows)}
    for label, group in groups.items():
        if along is not None:
            group = sorted(group, key=lambda row: _value_of(along, row[along.name]))
        recall = [row["recall"] for row in group]
        precision = [row["precision"] for row in group]
        panel.plot(recall, precision, marker="o", label=label or None)
        if along is not None:
            for row, x, y in zip(group, recall, precision):
                panel.annotate(
                    f"{row[along.name]}", (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small",
                )  # fmt: skip
    panel.set_xlabel("recall")
    panel.set_ylabel("precision")
    if along is not None:
        panel.set_title(f"marked: {along.name}", fontsize="small")
    _legend(figure)
    return figure
