"""Samples and metrics during training (--sample_every) end to end on tiny digits models: grids
from the same noise, the digits judge's figures in log.jsonl and metrics.png, resume, the
weights sampled, bad input, an upsampler, and two processes against one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from admkit import checkpoint as ckpt
from admkit import quality
from admkit.cli import build_parser, main
from admkit.data import make_low_res, open_dataset
from admkit.generate import quantize
from admkit.runlog import Meter, read_log

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1"]
QUIET = ["--num_workers", "0", "--seed", "3", "--batch_size", "4"]
# Few evaluations, few images: the figures are as meaningful to these tests as at full size.
SAMPLING = ["--sample_steps", "4", "--sample_grid", "12", "--eval_samples", "8"]
# Learning rate 1e-30: the weights (and so the EMA) stay where they started.
STILL = [*TINY, *QUIET, *SAMPLING, "--class_cond", "True", "--lr", "1e-30", "--ema_rate", "0.9"]
STILL += ["--steps", "5", "--sample_every", "2", "--save_interval", "5"]
METRICS = ["eval_frechet_distance", "eval_precision", "eval_recall", "eval_judged_accuracy"]

# A few samples give covariances of low rank; scipy warns that their product is singular.
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_a_quick_judge():
    """One thread, as each torchrun process has; and a judge trained for 30 steps, not 400 (a
    run trains it once and keeps it as RUN/judge.pt)."""
    threads, judge_steps = torch.get_num_threads(), quality.JUDGE_STEPS
    torch.set_num_threads(1)
    quality.JUDGE_STEPS = 30
    yield
    torch.set_num_threads(threads)
    quality.JUDGE_STEPS = judge_steps


def _train(out, *extra) -> list[str]:
    return ["train", "--data", "digits", "--out", str(out), *extra]


def _grids(run) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((run / "samples").iterdir())}


def _weights(run) -> dict[str, dict[str, torch.Tensor]]:
    latest = ckpt.latest_checkpoint(run)
    return {name: ckpt.read_weights(latest, name) for name in ckpt.weight_names(latest)}


def _evaluations(run) -> list[dict]:
    """The evaluation records, without their timing."""
    records = [r for r in read_log(run) if "eval_samples" in r]
    return [{k: v for k, v in r.items() if k != "eval_seconds"} for r in records]


def _sample_grid(tmp_path, capsys, model, *options) -> bytes:
    """The grid that ``admkit sample`` draws, with the monitor's sampler and steps."""
    grid = tmp_path / f"grid-{len(list(tmp_path.iterdir()))}.png"
    argv = ["sample", "--model", str(model), "--sampler", "dpm++2m-sde", "--steps", "4"]
    argv += ["--seed", "3", "--out", str(grid.with_suffix(".npz")), "--grid", str(grid)]
    assert main([*argv, *options]) == 0
    capsys.readouterr()
    return grid.read_bytes()


@pytest.fixture(scope="module")
def still_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("still") / "run"
    assert main(_train(run, *STILL)) == 0
    return run


# -- grids and figures ------------------------------------------------------------------------


def test_grids_start_from_the_same_noise_and_the_judge_logs_its_figures(
    still_run, tmp_path, capsys
):
    # Every 2 steps and at the last: from the same noise, weights that do not move give the
    # same picture every time.
    grids = _grids(still_run)
    assert list(grids) == ["step_000002.png", "step_000004.png", "step_000005.png"]
    assert len(set(grids.values())) == 1
    assert grids["step_000002.png"][:8] == b"\x89PNG\r\n\x1a\n"
    # The grid is what admkit sample draws from the first EMA with the labels 0, 1, ..., 9
    # cycled, so it sampled those weights, from those seeds, on that chain.
    labels = [arg for k in range(10) for arg in ("--class_label", str(k))]
    expected = _sample_grid(tmp_path, capsys, still_run, "--weights", "ema_0.9", *labels,
                            "--num_samples", "12")  # fmt: skip
    assert grids["step_000002.png"] == expected

    records = read_log(still_run)
    evaluations = [r for r in records if "eval_samples" in r]
    assert [r["step"] for r in evaluations] == [2, 4, 5]
    for record in evaluations:
        assert set(record) == {"step", *METRICS, "eval_samples", "eval_seconds"}
        assert record["eval_samples"] == 8 and record["eval_seconds"] > 0
        assert 0 <= record["eval_judged_accuracy"] <= 1 and record["eval_frechet_distance"] > 0
    assert _evaluations(still_run)[0] | {"step": 5} == _evaluations(still_run)[-1]
    # Training records keep their own lines; the loss is still logged at its interval.
    assert [r["step"] for r in records if "loss" in r] == [5]
    assert (still_run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (still_run / "judge.pt").is_file()
    # The options are not part of the run: config.json does not hold them.
    config = (still_run / "config.json").read_text()
    assert "sample_every" not in config and "eval_" not in config


def test_an_unconditional_model_logs_no_judged_accuracy_and_overwrite_clears(tmp_path):
    run = tmp_path / "run"
    options = [*TINY, *QUIET, *SAMPLING, "--steps", "2", "--sample_every", "2"]
    assert main(_train(run, *options)) == 0
    (record,) = _evaluations(run)
    assert set(record) == {"step", *METRICS[:3], "eval_samples"}  # no NaN in the JSON
    assert "NaN" not in (run / "log.jsonl").read_text()
    # --overwrite starts over: no grid, metrics or judge of the old run survives.
    assert main(_train(run, *TINY, *QUIET, "--steps", "1", "--overwrite")) == 0
    assert not (run / "samples").exists() and not (run / "metrics.png").exists()
    assert not (run / "judge.pt").exists()


def test_a_resumed_run_writes_the_same_grids_and_records(tmp_path, capsys):
    # Dropout draws from the global generator, which training the judge reseeds.
    base = [*TINY, *QUIET, "--lr", "2e-3", "--ema_rate", "0.5", "--dropout", "0.1"]
    base += ["--class_cond", "True", "--save_interval", "2"]
    options = [*base, *SAMPLING, "--sample_every", "2"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(_train(reference, *options, "--steps", "4")) == 0
    assert main(_train(run, *options, "--steps", "2")) == 0
    # What a run killed after step 3 had written past its checkpoint of step 2.
    (run / "samples" / "step_000003.png").write_bytes(b"a grid of step 3")
    with open(run / "log.jsonl", "a") as log:
        log.write(json.dumps({"step": 3, "eval_recall": 0.5, "eval_samples": 8}) + "\n")
    assert main(_train(run, *options, "--steps", "4")) == 0

    grids = _grids(reference)
    assert list(grids) == ["step_000002.png", "step_000004.png"]
    assert grids["step_000002.png"] != grids["step_000004.png"]  # the weights moved
    assert _grids(run) == grids
    assert [r["step"] for r in _evaluations(reference)] == [2, 4]
    assert _evaluations(run) == _evaluations(reference)
    # By default the first EMA is sampled.
    labels = [arg for k in range(10) for arg in ("--class_label", str(k))]
    expected = _sample_grid(tmp_path, capsys, run, "--weights", "ema_0.5", *labels,
                            "--num_samples", "12")  # fmt: skip
    assert grids["step_000004.png"] == expected
    # Sampling changed nothing in the training: the weights are those of a run without it.
    plain = tmp_path / "plain"
    assert main(_train(plain, *base, "--steps", "4")) == 0
    weights, plain_weights = _weights(run), _weights(plain)
    for name, state in plain_weights.items():
        assert all(torch.equal(state[key], weights[name][key]) for key in state), name


def test_sample_weights_picks_the_weights_that_are_sampled(tmp_path, capsys):
    run = tmp_path / "run"
    options = [*TINY, *QUIET, *SAMPLING, "--lr", "2e-3", "--ema_rate", "0.5", "--phema", "0.10"]
    options += ["--steps", "3", "--sample_every", "3", "--eval_samples", "0"]
    assert main(_train(run, *options, "--sample_weights", "phema_0.10")) == 0
    assert not (run / "metrics.png").exists()  # grids only
    grid = (run / "samples" / "step_000003.png").read_bytes()
    drawn = {
        name: _sample_grid(tmp_path, capsys, run, "--weights", name, "--num_samples", "12")
        for name in ("model", "ema_0.5", "phema_0.10")
    }
    assert grid == drawn["phema_0.10"]
    assert len(set(drawn.values())) == 3
    # A resumed run may change what it samples: those options are not part of the run.
    more = [*options, "--steps", "4", "--sample_every", "4", "--sample_weights", "model"]
    assert main(_train(run, *more)) == 0
    assert (run / "samples" / "step_000004.png").is_file()


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_batch(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "ref.npz"
    np.savez(path, np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    return path


@pytest.mark.parametrize(
    "options, message",
    [
        (["--eval_samples", "8"], "--eval_samples goes with --sample_every N"),
        (["--sample_weights", "model"], "--sample_weights goes with --sample_every N"),
        (["--sample_every", "0"], "--sample_every 0 must be at least 1"),
        (["--sample_every", "2", "--sample_weights", "ema_0.5"], "keeps model, ema_0.9999;"),
        (["--sample_every", "2", "--eval_samples", "3"], "--eval_samples 3 must be at least 4"),
        (["--sample_every", "2", "--sample_sampler", "euler"], "'euler' is not a sampler"),
        (["--sample_every", "2", "--sample_steps", "1001"], "between 1 and 1000 for dpm++2m-sde"),
        (["--sample_every", "2", "--sample_grid", "257"], "--sample_grid 257 must be between"),
        (["--sample_every", "2", "--sample_batch_size", "0"], "--sample_batch_size 0 must be"),
        (["--sample_every", "2", "--eval_ref", "missing.npz"], "--eval_ref missing.npz: no such"),
        (["--sample_every", "2", "--eval_ref", "BAD"], "is not a readable .npz batch"),
        (["--sample_every", "2", "--inception_weights", "w.pth"], "add --eval_ref"),
        (["--sample_every", "2", "--eval_ref", "REF", "--eval_samples", "0"], "scores nothing"),
        (
            ["--sample_every", "2", "--eval_ref", "REF", "--inception_weights", "missing.pth"],
            "--inception_weights missing.pth: no such file",
        ),
        (["--sample_every", "2", "--eval_ref", "REF"], "no FID Inception weights found"),
    ],
)
def test_bad_options_are_one_line_errors_before_the_run_exists(
    options, message, tmp_path, capsys, monkeypatch, reference_batch
):
    monkeypatch.delenv("ADMKIT_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    replace = {"BAD": str(tmp_path / "bad.npz"), "REF": str(reference_batch)}
    options = [replace.get(option, option) for option in options]
    run = tmp_path / "run"
    assert main(_train(run, *TINY, *QUIET, "--steps", "2", *options)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
    assert not run.exists()


def test_eval_samples_need_a_reference_off_the_digits_and_classifiers_take_no_samples(
    tmp_path, capsys
):
    data = tmp_path / "data.npz"
    np.savez(data, np.zeros((8, 8, 8, 3), np.uint8))
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, *QUIET]
    assert main([*argv, "--steps", "2", "--sample_every", "2", "--eval_samples", "8"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "needs something to score against: --eval_ref" in error[0]
    classifier = ["train-classifier", "--data", "digits", "--out", "x", "--sample_every", "2"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(classifier)
    capsys.readouterr()


# -- Inception metrics, an upsampler, two processes ----------------------------------------------


class StandInInceptionScorer:
    """Stands in for the Inception evaluator, whose Fréchet distances of 2048-dimensional
    features cost seconds each on a CPU; it records what it was given."""

    made: list[tuple] = []
    scored: list[tuple] = []

    def __init__(self, reference_path, inception_weights=None, device="cpu") -> None:
        self.made.append((str(reference_path), str(inception_weights), str(device)))

    def score(self, images, labels):
        self.scored.append((images.shape, labels))
        return {"inception_score": float("nan"), "fid": 12.5, "sfid": 20.0, "precision": 0.25,
                "recall": 0.75}  # fmt: skip


def test_eval_ref_scores_with_the_inception_evaluator(
    tmp_path, monkeypatch, reference_batch, capsys
):
    from admkit.metrics.inception import random_inception

    weights = tmp_path / "inception.pth"
    torch.save(random_inception(seed=0).state_dict(), weights)  # read before training starts
    monkeypatch.setattr(quality, "InceptionScorer", StandInInceptionScorer)
    monkeypatch.setattr(StandInInceptionScorer, "made", [])
    monkeypatch.setattr(StandInInceptionScorer, "scored", [])
    run = tmp_path / "run"
    options = [*TINY, *QUIET, *SAMPLING, "--steps", "2", "--sample_every", "1"]
    options += ["--eval_ref", str(reference_batch), "--inception_weights", str(weights)]
    assert main(_train(run, *options)) == 0
    assert StandInInceptionScorer.made == [(str(reference_batch), str(weights), "cpu")]
    assert StandInInceptionScorer.scored == [((8, 8, 8, 3), None)] * 2
    records = _evaluations(run)
    assert records == [
        {"step": step, "eval_fid": 12.5, "eval_sfid": 20.0, "eval_precision": 0.25,
         "eval_recall": 0.75, "eval_samples": 8}  # the NaN Inception Score is left out
        for step in (1, 2)
    ]  # fmt: skip
    assert not (run / "judge.pt").exists()  # the reference wins over the judge


def test_an_upsampler_upsamples_the_first_training_images(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train-upsampler", "--data", "digits", "--out", str(run), "--large_size", "16"]
    argv += ["--small_size", "8", "--num_channels", "32", "--num_res_blocks", "1", *QUIET]
    argv += [*SAMPLING, "--ema_rate", "0.9", "--steps", "2", "--sample_every", "2"]
    assert main(argv) == 0
    (record,) = _evaluations(run)
    # The judge reads the upsampled digit against the label of the digit it came from.
    assert set(record) == {"step", *METRICS, "eval_samples"}
    # The grid is admkit upsample's over the first 12 digits, area-downsampled.
    data = open_dataset("digits", 16)
    first = torch.stack([data.load(i)[0] for i in range(12)])
    base = tmp_path / "base.npz"
    np.savez(base, quantize(make_low_res(first, 8)).numpy())
    grid = tmp_path / "grid.png"
    upsample = ["upsample", "--model", str(run), "--base_samples", str(base), "--seed", "3"]
    upsample += ["--sampler", "dpm++2m-sde", "--steps", "4", "--out", str(tmp_path / "up.npz")]
    assert main([*upsample, "--grid", str(grid)]) == 0
    capsys.readouterr()
    assert (run / "samples" / "step_000002.png").read_bytes() == grid.read_bytes()


def test_two_processes_write_the_same_grids_and_records_as_one(still_run, tmp_path):
    two = tmp_path / "two"
    # The run's judge, so that both score with the same one (this one trained for 30 steps).
    two.mkdir()
    for name in ("config.json", "judge.pt"):
        shutil.copy(still_run / name, two / name)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "admkit", *_train(two, *STILL)]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()[-3000:]

    assert _grids(two) == _grids(still_run)
    one, other = _evaluations(still_run), _evaluations(two)
    assert [r["step"] for r in other] == [2, 4, 5]  # written once, by rank 0
    for record, expected in zip(other, one):
        assert record.keys() == expected.keys()
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert len(ckpt.read_training_state(ckpt.latest_checkpoint(two))["rng"]) == 2


def test_time_spent_sampling_is_not_training_time():
    meter = Meter()
    meter.steps = 1
    with meter.paused():
        time.sleep(0.1)
    assert meter.record(1, 1e-4, 4)["images_per_s"] > 4 / 0.1 * 10
