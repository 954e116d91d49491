"""``admkit sweep`` end to end on a tiny model of the built-in digits: the grid, its files, the
same noise in every cell, resuming after an interruption, two processes, the evaluator's
numbers, and the one-line errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from admkit.cli import main
from admkit.cli import sweep as sweep_cli
from admkit.errors import UserError
from admkit.metrics.inception import random_inception
from admkit.sweep import Axis, grid, parse_axis

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1"]
# Few images: the judge's 128-dimensional covariances are singular, as scipy says.
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny digits model with checkpoints at steps 2 and 4 (the first guides the second)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("sweep") / "run"
    argv = ["train", "--data", "digits", "--out", str(path), *TINY, "--steps", "4"]
    argv += ["--save_interval", "2", "--batch_size", "8", "--lr", "1e-3", "--num_workers", "0"]
    argv += ["--ema_rate", "0.5"]
    assert main(argv) == 0
    yield path
    torch.set_num_threads(threads)


def _sweep(run: Path, out: Path, *extra) -> list[str]:
    argv = ["sweep", "--model", str(run), "--out", str(out), "--sampler", "ddim"]
    argv += ["--guide_model", str(run / "checkpoints" / "step_000002")]
    return argv + ["--num_samples", "8", "--batch_size", "4", *[str(e) for e in extra]]


def _table(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as file:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(file)]


def test_axes_are_comma_lists_of_typed_values():
    axis = parse_axis("guide_scale", "1, 1.5,2", float)
    assert axis.labels == ("1", "1.5", "2") and axis.values == (1.0, 1.5, 2.0) and axis.numeric
    intervals = parse_axis("guidance_interval", "100,800;0,999", str, ";")
    assert intervals.values == ("100,800", "0,999") and not intervals.numeric
    steps = parse_axis("steps", "10,20", int)
    assert grid([axis, steps]) == [
        {"guide_scale": a, "steps": b} for a in range(3) for b in range(2)
    ]  # the last axis varies fastest
    for text, message in [("1,,2", "empty"), ("1,1", "twice"), ("1,x", "'x' is not a valid")]:
        with pytest.raises(UserError, match=message):
            parse_axis("guide_scale", text, float)


def test_sweep_writes_every_file_and_each_cell_is_what_sample_draws(run, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = _sweep(run, out, "--guide_scale", "1,2", "--steps", "3,4")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "guide_scale" in printed and "frechet_distance" in printed
    table = _table(out)
    assert [(r["guide_scale"], r["steps"]) for r in table] == [
        ("1", "3"), ("1", "4"), ("2", "3"), ("2", "4"),
    ]  # fmt: skip
    columns = list(table[0])
    assert columns == [
        "guide_scale", "steps", "frechet_distance", "precision", "recall", "judged_accuracy",
        "num_samples", "model_evals", "network_evals",
    ]  # fmt: skip
    # The guide is not run at scale 1; it doubles the network passes at scale 2.
    assert [r["network_evals"] for r in table] == ["3", "4", "6", "8"]
    assert {r["judged_accuracy"] for r in table} == {""}  # unconditional: no labels to judge
    document = json.loads((out / "results.json").read_text())
    assert document["axes"] == {"guide_scale": ["1", "2"], "steps": ["3", "4"]}
    assert document["fixed"]["sampler"] == "ddim" and document["command"].startswith("admkit sweep")
    assert len(document["cells"]) == 4
    report = (out / "report.md").read_text()
    assert "| guide_scale | steps | frechet_distance" in report
    for plot in ("vs_guide_scale.png", "vs_steps.png", "precision_recall.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{plot}" in report
    assert len(list((out / "cells").glob("*.json"))) == 4
    assert len(list((out / "grids").glob("*.png"))) == 4

    # Cell (guide_scale 2, steps 3) holds the images `admkit sample` draws with those options:
    # the same picture, and the judge's numbers for them.
    samples = tmp_path / "cell.npz"
    command = ["sample", "--model", str(run), "--out", str(samples), "--sampler", "ddim"]
    command += ["--steps", "3", "--guide_model", str(run / "checkpoints" / "step_000002")]
    command += ["--guide_scale", "2", "--num_samples", "8", "--batch_size", "8"]
    command += ["--grid", str(tmp_path / "cell.png")]
    assert main(command) == 0
    grids = {p.read_bytes() for p in (out / "grids").glob("*.png")}
    assert (tmp_path / "cell.png").read_bytes() in grids
    scorer = sweep_cli.DigitsScorer(sweep_cli.digits_judge(out / "judge.pt"))
    with np.load(samples) as archive:
        expected = scorer.score(archive["arr_0"], None)
    assert float(table[2]["frechet_distance"]) == pytest.approx(expected["frechet_distance"])
    assert float(table[2]["recall"]) == pytest.approx(expected["recall"])


def test_an_interrupted_sweep_continues_and_a_grown_grid_reuses_its_cells(
    run, tmp_path, capsys, monkeypatch
):
    out, reference = tmp_path / "sweep", tmp_path / "reference"
    assert main(_sweep(run, reference, "--guide_scale", "1,1.5,2", "--steps", "3")) == 0
    calls = []
    original = sweep_cli.run_cell

    def interrupted(*args, **kwargs):
        calls.append(args[0].guide_scale)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second cell
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep_cli, "run_cell", interrupted)
    assert main(_sweep(run, out, "--guide_scale", "1,1.5,2", "--steps", "3")) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert len(list((out / "cells").glob("*.json"))) == 1 and not (out / "results.csv").exists()
    # The same command again runs only the two cells that were missing...
    calls.clear()
    monkeypatch.setattr(
        sweep_cli, "run_cell", lambda *a, **k: calls.append(a[0]) or original(*a, **k)
    )
    assert main(_sweep(run, out, "--guide_scale", "1,1.5,2", "--steps", "3")) == 0
    assert [options.guide_scale for options in calls] == [1.5, 2.0]
    assert "1 of 3 cells are done" in capsys.readouterr().err
    assert _table(out) == _table(reference)
    # ...and a larger grid (another batch size changes no image) only the new cell.
    calls.clear()
    grown = _sweep(run, out, "--guide_scale", "1,1.5,2,3", "--steps", "3", "--batch_size", 8)
    assert main(grown) == 0
    assert [options.guide_scale for options in calls] == [3.0]
    assert _table(out)[:3] == _table(reference)
    # --overwrite starts over.
    calls.clear()
    assert main([*_sweep(run, out, "--guide_scale", "1", "--steps", "3"), "--overwrite"]) == 0
    assert len(calls) == 1 and len(list((out / "cells").glob("*.json"))) == 1


def test_cells_that_differ_only_in_an_unused_guide_run_once(run, tmp_path, monkeypatch):
    calls = []
    original = sweep_cli.run_cell
    monkeypatch.setattr(
        sweep_cli, "run_cell", lambda *a, **k: calls.append(a[0]) or original(*a, **k)
    )
    guides = ",".join(str(run / "checkpoints" / f"step_00000{n}") for n in (2, 4))
    argv = _sweep(run, tmp_path / "s", "--steps", "3", "--guide_scale", "1,2")
    assert main([*argv, "--guide_model", guides]) == 0  # the last --guide_model counts
    # At scale 1 no guide runs: one cell stands for both guides.
    assert [(Path(o.guide_model).name, o.guide_scale) for o in calls] == [
        ("step_000002", 1.0), ("step_000002", 2.0), ("step_000004", 2.0),
    ]  # fmt: skip
    table = _table(tmp_path / "s")
    assert [(Path(r["guide_model"]).name, r["guide_scale"]) for r in table] == [
        ("step_000002", "1"), ("step_000002", "2"), ("step_000004", "1"), ("step_000004", "2"),
    ]  # fmt: skip
    assert table[0]["frechet_distance"] == table[2]["frechet_distance"]
    assert table[1]["frechet_distance"] != table[3]["frechet_distance"]


def test_two_processes_give_the_table_of_one(run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # the arithmetic of a torchrun process, in both runs
    grid_options = ["--guide_scale", "1,2", "--steps", "3,4"]
    one = [sys.executable, "-m", "admkit", *_sweep(run, tmp_path / "one", *grid_options)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two += ["-m", "admkit", *_sweep(run, tmp_path / "two", *grid_options)]
    for command in (one, two):
        result = subprocess.run(command, env=env, capture_output=True, timeout=600)
        assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert _table(tmp_path / "two") == _table(tmp_path / "one")


def test_a_reference_batch_scores_cells_as_evaluate_does(run, tmp_path, capsys):
    weights = tmp_path / "inception.pth"
    torch.save(random_inception(seed=0).state_dict(), weights)
    reference = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(reference, rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "sweep"
    # Few images: the Inception network is slow on a CPU (the last --num_samples counts).
    argv = _sweep(run, out, "--guide_scale", "1", "--steps", "3", "--ref", reference)
    argv += ["--num_samples", "4"]
    assert main([*argv, "--inception_weights", str(weights)]) == 0
    (row,) = _table(out)
    assert list(row)[:5] == ["inception_score", "fid", "sfid", "precision", "recall"]  # no axes
    samples = tmp_path / "samples.npz"
    command = ["sample", "--model", str(run), "--out", str(samples), "--sampler", "ddim"]
    assert main([*command, "--steps", "3", "--num_samples", "4"]) == 0
    evaluated = tmp_path / "metrics.json"
    command = ["evaluate", str(reference), str(samples), "--inception_weights", str(weights)]
    assert main([*command, "--json", str(evaluated)]) == 0
    expected = json.loads(evaluated.read_text())
    for name in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert float(row[name]) == pytest.approx(expected[name], rel=1e-5), name
    capsys.readouterr()


def test_bad_sweeps_are_one_line_errors(run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    a_file = tmp_path / "file"
    a_file.write_text("")
    base = ["sweep", "--model", str(run), "--num_samples", "8", "--steps", "3"]
    cases = [
        (["--out", str(other)], "holds other files"),
        (["--out", str(a_file)], "is a file"),
        (["--out", str(tmp_path / "s"), "--guide_scale", "1,x"], "'x' is not a valid"),
        (["--out", str(tmp_path / "s"), "--sampler", "ddim,heun", "--eta", "0.5"], "heun"),
        (["--out", str(tmp_path / "s"), "--ref", str(tmp_path / "nothing.npz")], "does not exist"),
        (["--out", str(tmp_path / "s"), "--ref", str(a_file), "--judge", "digits"], "not both"),
        (["--out", str(tmp_path / "s"), "--guide_scale", "1,2"], "needs both --guide_model"),
        (["--out", str(tmp_path / "s"), "--num_samples", "2"], "4 or more"),
    ]
    for argv, message in cases:
        code = main([*base, *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)
    assert not (tmp_path / "s").exists()
    assert (other / "notes.txt").read_text() == "mine"
    # A model that was not trained on the digits needs to be told how to score.
    config = json.loads((run / "config.json").read_text())
    config["data"]["source"] = str(tmp_path / "photos")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps(config))
    (foreign / "checkpoints").symlink_to(run / "checkpoints")
    code = main(["sweep", "--model", str(foreign), "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--ref REF.npz" in err[0]


def test_a_weights_file_added_to_a_checkpoint_is_part_of_a_cells_identity(tmp_path):
    # admkit ema writes phema files into a checkpoint after it was saved (its manifest does not
    # change): a sweep or sampling job reading one must see when it is written again.
    import safetensors.torch

    from admkit.checkpoint import save_checkpoint
    from admkit.partial_samples import weights_identity

    checkpoint = save_checkpoint(tmp_path, 1, {"model": {"w": torch.zeros(2)}}, {"step": 1})
    added = checkpoint / "phema_0.04.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, added)
    before = weights_identity(tmp_path, "phema_0.04")
    safetensors.torch.save_file({"w": torch.zeros(3)}, added)
    assert weights_identity(tmp_path, "phema_0.04") != before
    assert "weights_file" not in weights_identity(tmp_path)  # no name: the manifest alone


def test_post_hoc_ema_profiles_are_plotted_against_their_sigma_rel(tmp_path):
    from admkit.sweep import _abscissa, plot_results

    labels = ("ema_0.999", "phema_0.05", "phema_0.10", "model")
    axis = Axis("weights", labels, labels)
    x_label, x_of = _abscissa(axis)
    assert "sigma_rel" in x_label and [x_of(label) for label in labels] == [None, 0.05, 0.1, None]
    assert _abscissa(Axis("sampler", ("ddpm", "ddim"), ("ddpm", "ddim"))) is None
    rows = [
        {"weights": label, "frechet_distance": fd, "precision": 0.8, "recall": 0.9}
        for label, fd in zip(labels, (40.0, 45.0, 38.0, 900.0))
    ]
    plots = plot_results(tmp_path, [axis], rows, ["frechet_distance", "precision", "recall"])
    assert [p.name for p in plots] == ["vs_weights.png", "precision_recall.png"]
