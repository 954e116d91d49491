"""The training commands end to end on tiny models: train, train-classifier, train-upsampler."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from admkit import checkpoint as ckpt
from admkit.cli import build_parser, main
from admkit.cli.models import load_model
from admkit.diffusion import Diffusion
from admkit.errors import UserError
from admkit.objectives import ClassifierLoss, DiffusionLoss
from admkit.timestep_sampling import LossSecondMomentResampler, UniformSampler

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1"]
TINY_CLASSIFIER = [
    *("--image_size", "8", "--classifier_width", "32", "--classifier_depth", "1"),
    *("--classifier_attention_resolutions", ""),
]
QUIET = ["--num_workers", "0", "--seed", "3"]


def _log(run_dir) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(run_dir) -> dict:
    return json.loads((Path(run_dir) / "config.json").read_text())


def _steps(run_dir) -> list[int]:
    return [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(run_dir)]


def _final_weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    latest = ckpt.latest_checkpoint(run_dir)
    return {name: ckpt.read_weights(latest, name) for name in ckpt.weight_names(latest)}


def _train(out, *extra) -> list[str]:
    return ["train", "--data", "digits", "--out", str(out), *TINY, *QUIET, *extra]


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# -- admkit train --------------------------------------------------------------------------------


def test_train_learns_writes_the_run_and_resumes_when_rerun(tmp_path, capsys):
    run = tmp_path / "run"
    options = ["--class_cond", "True", "--cfg_dropout", "0.2", "--batch_size", "16"]
    options += ["--lr", "2e-3", "--ema_rate", "0.9", "--log_interval", "10"]
    assert main(_train(run, *options, "--steps", "30", "--save_interval", "15")) == 0
    records = _log(run)
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    assert {"mse", "loss_q0", "loss_q3", "lr", "images_per_s"} <= set(records[-1])
    assert _steps(run) == [15, 30]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # config.json holds what the sampling commands read: K real classes plus the null label.
    config = _config(run)
    assert config["kind"] == "diffusion" and config["num_classes"] == 10
    assert config["cfg_null_label"] == 10 and config["flags"]["num_classes"] == 11
    assert config["class_names"] == [str(d) for d in range(10)]
    loaded = load_model(run, "diffusion")
    assert loaded.cfg_null_label == 10 and loaded.num_classes == 10
    assert loaded.network.label_emb.weight.shape[0] == 11
    assert ckpt.read_weights(ckpt.latest_checkpoint(run))["label_emb.weight"].shape[0] == 11

    # The same command again: nothing left to do. More steps: it continues where it stopped.
    before = _final_weights(run)
    assert main(_train(run, *options, "--steps", "30", "--save_interval", "15")) == 0
    assert _steps(run) == [15, 30]
    assert main(_train(run, *options, "--steps", "40", "--save_interval", "15")) == 0
    assert _steps(run) == [15, 30, 40]
    assert [r["step"] for r in _log(run)] == [10, 20, 30, 40]
    assert not torch.equal(
        _final_weights(run)["model"]["out.2.weight"], before["model"]["out.2.weight"]
    )
    capsys.readouterr()

    # An option that matters cannot change under a run; --overwrite starts it over.
    assert main(_train(run, *options, "--steps", "40", "--lr", "1e-3")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "train.lr: 0.002 -> 0.001" in error[0]
    assert main(_train(run, *options, "--steps", "2", "--lr", "1e-3", "--overwrite")) == 0
    assert _steps(run) == [2] and [r["step"] for r in _log(run)] == [2]


def test_init_from_starts_a_run_from_other_weights_and_resumes_without_them(tmp_path, capsys):
    # The source trains from another seed, so its weights are far from this seed's random init.
    source = tmp_path / "source"
    assert main(_train(source, "--steps", "2", "--batch_size", "4", "--seed", "7")) == 0
    latest = ckpt.latest_checkpoint(source)
    source_ema, source_model = ckpt.read_weights(latest, "ema_0.9999"), ckpt.read_weights(latest)
    # A learning rate of 1e-30 leaves the first step's weights where they started.
    tuned, from_file = tmp_path / "tuned", tmp_path / "from_file"
    options = ["--steps", "1", "--batch_size", "4", "--lr", "1e-30"]
    assert main(_train(tuned, *options, "--init_from", str(source))) == 0
    assert main(_train(from_file, *options, "--init_from", str(latest / "model.safetensors"))) == 0
    capsys.readouterr()
    started = {"from the run's EMA": (tuned, source_ema), "from a file": (from_file, source_model)}
    for run, expected in started.values():
        weights = _final_weights(run)
        for name in ("model", "ema_0.9999"):
            assert weights[name].keys() == expected.keys()
            for key, value in expected.items():
                torch.testing.assert_close(weights[name][key], value, rtol=0, atol=1e-6)
    fresh = tmp_path / "fresh"
    assert main(_train(fresh, *options)) == 0
    distance = max(
        (_final_weights(fresh)["model"][k] - v).abs().max() for k, v in source_ema.items()
    )
    assert distance > 1e-2
    assert _config(tuned)["init_from"] == str(source.resolve())

    # Resuming continues from the run's own checkpoint and never reads the source again...
    shutil.rmtree(source)
    tuned_command = _train(tuned, "--steps", "2", "--batch_size", "4", "--lr", "1e-30")
    assert main([*tuned_command, "--init_from", str(source)]) == 0
    assert _steps(tuned) == [1, 2]
    capsys.readouterr()
    # ...and other weights under the same run are a clear error, as any changed option.
    assert main([*tuned_command, "--init_from", str(from_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "init_from" in err[0], err
    # Missing or unfitting weights fail before a run directory exists.
    for init_from, message in [(source, "does not exist"), (tuned, "does not match")]:
        new_run = tmp_path / "never"
        assert (
            main(_train(new_run, *options, "--num_channels", "64", "--init_from", str(init_from)))
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not new_run.exists()


def test_use_fp16_means_fp16_autocast_and_unconditional_config(tmp_path):
    run = tmp_path / "run"
    assert main(_train(run, "--use_fp16", "True", "--steps", "2", "--batch_size", "4")) == 0
    config = _config(run)
    assert config["train"]["precision"] == "fp16"
    assert config["num_classes"] is None and config["cfg_null_label"] is None
    assert not any(
        key.startswith("label_emb") for key in ckpt.read_weights(ckpt.latest_checkpoint(run))
    )


def test_sigkill_mid_run_then_rerun_gives_bit_identical_weights(tmp_path):
    # Every source of randomness: t from a warmed-up loss-aware sampler (T = 4), ε, the label
    # drop, dropout (the global generator), micro-batches.
    command = [sys.executable, "-m", "admkit", *_train("RUN"), "--steps", "32"]
    command += ["--batch_size", "8", "--microbatch", "4", "--save_interval", "4"]
    command += ["--log_interval", "1", "--diffusion_steps", "4", "--noise_schedule", "cosine"]
    command += ["--dropout", "0.1"]
    command += ["--schedule_sampler", "loss-second-moment", "--class_cond", "True"]
    command += ["--cfg_dropout", "0.3", "--ema_rate", "0.9,0.5", "--lr", "1e-3"]

    def start(run_dir):
        argv = [str(run_dir) if part == "RUN" else part for part in command]
        return subprocess.Popen(
            argv, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def finish(process):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()[-2000:]

    finish(start(tmp_path / "reference"))
    run = tmp_path / "run"
    process = start(run)
    deadline = time.monotonic() + 120
    while True:
        latest = ckpt.latest_checkpoint(run)
        if latest is not None and (run / "log.jsonl").exists():
            if any(r["step"] > ckpt.checkpoint_step(latest) for r in _log(run)[:-1]):
                break
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(run)) < 32
    finish(start(run))
    resumed, reference = _final_weights(run), _final_weights(tmp_path / "reference")
    assert resumed.keys() == reference.keys() == {"model", "ema_0.9", "ema_0.5"}
    for name in reference:
        for key in reference[name]:
            assert torch.equal(resumed[name][key], reference[name][key]), (name, key)
    state = ckpt.read_training_state(ckpt.latest_checkpoint(run))["loss_fn"]
    assert (state["loss_counts"] == 10).all()  # the sampler was warmed up: importance sampling
    assert [r["loss"] for r in _log(run)] == [r["loss"] for r in _log(tmp_path / "reference")]


# -- train-classifier, train-upsampler -----------------------------------------------------------


def test_train_classifier_beats_chance_and_logs_validation(tmp_path):
    run = tmp_path / "clf"
    argv = ["train-classifier", "--data", "digits:train", "--val_data", "digits:heldout"]
    argv += ["--out", str(run), *TINY_CLASSIFIER, *QUIET, "--noised", "False"]
    argv += ["--steps", "40", "--batch_size", "32", "--lr", "3e-3", "--log_interval", "20"]
    argv += ["--eval_interval", "10"]
    assert main(argv) == 0
    records = _log(run)
    assert [r["step"] for r in records] == [20, 40]
    assert records[-1]["acc@1"] > 0.3  # chance is 0.1
    assert records[-1]["acc@5"] >= records[-1]["acc@1"]
    assert records[-1]["val_acc@1"] > 0.2 and "val_loss" in records[-1]
    config = _config(run)
    assert config["kind"] == "classifier" and config["num_classes"] == 10
    assert config["flags"]["num_classes"] == 10
    loaded = load_model(run, "classifier")
    assert loaded.network(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)).shape == (
        2,
        10,
    )


def test_train_classifier_resumes_exactly_with_validation(tmp_path):
    def argv(run, steps):
        options = ["train-classifier", "--data", "digits:train", "--val_data", "digits:heldout"]
        options += ["--out", str(run), *TINY_CLASSIFIER, *QUIET, "--diffusion_steps", "50"]
        options += ["--batch_size", "8", "--log_interval", "5", "--eval_interval", "5"]
        return options + ["--steps", str(steps), "--ema_rate", "0.9"]

    assert main(argv(tmp_path / "reference", 20)) == 0
    assert main(argv(tmp_path / "run", 10)) == 0
    assert main(argv(tmp_path / "run", 20)) == 0
    resumed, reference = _final_weights(tmp_path / "run"), _final_weights(tmp_path / "reference")
    for name in reference:
        for key in reference[name]:
            assert torch.equal(resumed[name][key], reference[name][key]), (name, key)
    drop = ("images_per_s",)
    records = [[{k: v for k, v in r.items() if k not in drop} for r in _log(tmp_path / run)]
               for run in ("run", "reference")]  # fmt: skip
    assert records[0] == records[1] and "val_acc@5" in records[0][-1]
    assert "acc@1_q3" in records[0][-1]  # noised: accuracy by timestep quartile


def test_classifier_loss_feeds_original_step_indices():
    diffusion = Diffusion(np.linspace(1e-4, 0.02, 50))
    seen = []

    def model(x_t, t):
        seen.append(t)
        return torch.zeros(x_t.shape[0], 3).index_fill_(1, torch.tensor([2]), 1.0)

    x_0, y = torch.zeros(400, 3, 4, 4), torch.tensor([2, 0, 1, 2] * 100)
    generator = torch.Generator().manual_seed(0)
    terms = ClassifierLoss(diffusion)(model, (x_0, y), generator)
    (t,) = seen
    assert t.dtype == torch.long and torch.equal(t, terms["t"]) and terms["num_timesteps"] == 50
    assert 0 <= t.min() and t.max() < 50 and len(t.unique()) > 40
    # Logits favour class 2: top-1 hits exactly the label-2 half, top-5 (of 3 classes) all.
    assert terms["acc@1"].mean().item() == 0.5 and terms["acc@5"].mean().item() == 1.0
    expected = torch.nn.functional.cross_entropy(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([0]))
    assert torch.allclose(terms["loss"][1], expected)
    clean = ClassifierLoss(None)(model, (x_0, y), generator)
    assert torch.equal(seen[-1], torch.zeros(400, dtype=torch.long)) and "t" not in clean


def test_every_model_command_takes_the_channel_mult_its_error_asks_for(tmp_path, capsys):
    # 24 px has no default multipliers: the error names --channel_mult, which must then work.
    argv = ["train-classifier", "--data", "digits", "--out", str(tmp_path / "clf"), *QUIET]
    argv += ["--image_size", "24", "--classifier_width", "32", "--classifier_depth", "1"]
    argv += ["--classifier_attention_resolutions", "6", "--steps", "1", "--batch_size", "4"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "pass --channel_mult" in error[0], error
    assert main([*argv, "--channel_mult", "1,2,2"]) == 0
    classifier = load_model(tmp_path / "clf", "classifier")
    assert len(classifier.network.config.channel_mult) == 3
    logits = classifier.network(torch.zeros(2, 3, 24, 24), torch.zeros(2, dtype=torch.long))
    assert logits.shape == (2, 10)
    # A bare classifier .pt at that size loads with the same option, as sample reads it.
    bare = tmp_path / "clf.pt"
    torch.save(ckpt.read_weights(ckpt.latest_checkpoint(tmp_path / "clf")), bare)
    options = ["--image_size", "24", "--classifier_width", "32", "--classifier_depth", "1"]
    options += ["--classifier_attention_resolutions", "6", "--num_classes", "10"]
    parser = build_parser()
    args = parser.parse_args(["sample", "--model", "m", "--out", "o.npz", *options])
    with pytest.raises(UserError, match="pass --channel_mult"):
        load_model(bare, "classifier", args)
    args = parser.parse_args(
        ["sample", "--model", "m", "--out", "o.npz", *options, "--channel_mult", "1,2,2"]
    )
    assert load_model(bare, "classifier", args).num_classes == 10


def test_train_upsampler_runs(tmp_path):
    run = tmp_path / "up"
    argv = ["train-upsampler", "--data", "digits", "--out", str(run), *QUIET]
    argv += ["--large_size", "16", "--small_size", "8", "--num_channels", "32"]
    argv += ["--num_res_blocks", "1", "--class_cond", "True", "--lowres_noise", "0.1"]
    argv += ["--steps", "2", "--batch_size", "4", "--log_interval", "1"]
    assert main(argv) == 0
    assert [r["step"] for r in _log(run)] == [1, 2] and _steps(run) == [2]
    config = _config(run)
    assert config["kind"] == "upsampler" and config["objective"]["lowres_noise"] == 0.1
    assert config["flags"]["large_size"] == 16 and config["flags"]["small_size"] == 8
    loaded = load_model(run, "upsampler")
    x, low_res = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 8, 8)
    assert (
        loaded.network(x, torch.tensor([5]), low_res=low_res, y=torch.tensor([3])).shape == x.shape
    )


class _Recorder(torch.nn.Module):
    """A stand-in network that records what the loss feeds it and predicts zero noise."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x_t, t, **kwargs):
        self.calls.append({"t": t, **kwargs})
        return torch.zeros_like(x_t)


def test_upsampler_loss_conditions_on_block_means_plus_seeded_noise():
    diffusion = Diffusion(np.linspace(1e-4, 0.02, 10))
    x_0 = torch.rand(2, 3, 16, 16) * 2 - 1
    y = torch.tensor([1, 2])
    block_means = x_0.reshape(2, 3, 8, 2, 8, 2).mean(dim=(3, 5))  # area downsampling by 2
    model = _Recorder()
    plain = DiffusionLoss(diffusion, UniformSampler(10), class_cond=True, small_size=8)
    plain(model, (x_0, y), torch.Generator().manual_seed(0))
    assert torch.allclose(model.calls[-1]["low_res"], block_means, atol=1e-6)
    assert torch.equal(model.calls[-1]["y"], y)
    noisy = DiffusionLoss(
        diffusion, UniformSampler(10), class_cond=False, small_size=8, lowres_noise=0.5
    )
    for seed in (0, 0, 1):
        noisy(model, (x_0, y), torch.Generator().manual_seed(seed))
    first, again, other = (call["low_res"] - block_means for call in model.calls[-3:])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert abs(first.std().item() - 0.5) < 0.1 and "y" not in model.calls[-1]


def test_cfg_dropout_replaces_labels_with_the_null_label_at_rate_p():
    diffusion = Diffusion(np.linspace(1e-4, 0.02, 10))
    model = _Recorder()
    loss = DiffusionLoss(
        diffusion, UniformSampler(10), class_cond=True, cfg_dropout=0.25, null_label=10
    )
    y = torch.arange(4000) % 10
    terms = loss(model, (torch.zeros(4000, 3, 2, 2), y), torch.Generator().manual_seed(0))
    fed = model.calls[-1]["y"]
    dropped = fed == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert torch.equal(fed[~dropped], y[~dropped])
    assert terms["loss"].shape == (4000,) and torch.equal(terms["weight"], torch.ones(4000))


def test_loss_second_moment_sampler_state_round_trips_through_the_loss():
    diffusion = Diffusion(np.linspace(1e-4, 0.02, 4))
    loss = DiffusionLoss(diffusion, LossSecondMomentResampler(4), class_cond=False)
    loss.observe({"t": torch.tensor([0, 1, 1, 3]), "loss": torch.tensor([1.0, 2.0, 3.0, 4.0])})
    copy = DiffusionLoss(diffusion, LossSecondMomentResampler(4), class_cond=False)
    copy.load_state_dict(loss.state_dict())
    assert copy.state_dict()["loss_counts"].tolist() == [1, 2, 0, 1]
    assert copy.state_dict()["loss_history"][1, :2].tolist() == [2.0, 3.0]


# -- bad input -----------------------------------------------------------------------------------


def _labelless_npz(tmp_path) -> str:
    path = tmp_path / "images.npz"
    np.savez(path, np.zeros((4, 8, 8, 3), dtype=np.uint8))
    return str(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"--data": "/no/such/folder"}, "not found"),
        ({"--data": "EMPTY"}, "contains no images"),
        ({"--out": "FILE"}, "is a file"),
        ({"--out": "FULL"}, "not an admkit run directory"),
        ({"--preset": "imagenet1000"}, "unknown preset"),
        ({"--lr": "-1"}, "--lr -1.0 must be > 0"),
        ({"--batch_size": "6", "--microbatch": "4"}, "--microbatch 4 does not divide"),
        ({"--steps": None}, "--steps N"),
        ({"--steps": "10", "--lr_anneal_steps": "5"}, "lr_anneal_steps"),
        ({"--cfg_dropout": "0.1"}, "needs --class_cond True"),
        ({"--class_cond": "True", "--cfg_dropout": "1.5"}, "probability"),
        ({"--class_cond": "True", "--data": "NPZ"}, "has no labels"),
        ({"--class_cond": "True", "--num_classes": "3"}, "fewer than the 10 classes"),
        ({"--ema_rate": "0.99,fast"}, "comma list"),
        ({"--image_size": "12"}, "channel_mult"),
    ],
)
def test_bad_input_is_one_line_error_without_traceback(tmp_path, capsys, changes, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    places = {
        "EMPTY": str(tmp_path / "empty"),
        "FILE": str(tmp_path / "file"),
        "FULL": str(tmp_path / "full"),
        "NPZ": _labelless_npz(tmp_path),
    }
    options = {"--data": "digits", "--out": str(tmp_path / "run"), "--steps": "1"}
    options |= {"--batch_size": "4", **dict(zip(TINY[::2], TINY[1::2]))}
    options |= {name: places.get(value, value) for name, value in changes.items()}
    argv = ["train", *QUIET]
    for name, value in options.items():
        argv += [name, value] if value is not None else []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("admkit train: error:"), err
    assert message in err[0]
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "not a run"


def test_upsampler_and_classifier_option_errors(tmp_path, capsys):
    up = ["train-upsampler", "--data", "digits", "--out", str(tmp_path / "u"), "--steps", "1"]
    assert main([*up, "--large_size", "8", "--small_size", "8"]) == 2
    assert "--small_size 8 must be positive and below --large_size 8" in capsys.readouterr().err
    assert main([*up, "--large_size", "16", "--small_size", "8", "--lowres_noise", "-1"]) == 2
    assert "--lowres_noise -1.0" in capsys.readouterr().err
    clf = ["train-classifier", "--data", _labelless_npz(tmp_path), "--out", str(tmp_path / "c")]
    assert main([*clf, *TINY_CLASSIFIER, "--steps", "1"]) == 2
    assert "has no labels" in capsys.readouterr().err
    assert main([*clf, "--steps", "1", "--eval_interval", "0"]) == 2
    assert "--eval_interval 0" in capsys.readouterr().err


def test_small_images_warn_in_one_line_and_train(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{'cat' if i % 2 else 'dog'}_{i}.png")
    argv = ["train", "--data", str(folder), "--out", str(tmp_path / "run"), *TINY, *QUIET]
    argv += ["--steps", "1", "--batch_size", "4", "--class_cond", "True"]
    assert main(argv) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "smaller than image_size 8" in err[0]
    config = _config(tmp_path / "run")
    assert config["class_names"] == ["cat", "dog"] and config["data"]["random_flip"] is True


def test_loss_aware_sampler_draws_from_the_loop_generator():
    sampler = LossSecondMomentResampler(4)
    for _ in range(10):
        sampler.update_with_all_losses([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    p = 0.999 * np.array([1, 2, 3, 4]) / 10 + 0.001 / 4  # p_t ∝ √E[L_t²], IDDPM Eq. 18
    t, weight = sampler.sample(20000, "cpu", rng=torch.Generator().manual_seed(0))
    again, _ = sampler.sample(20000, "cpu", rng=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    frequencies = torch.bincount(t, minlength=4).double() / len(t)
    assert np.allclose(frequencies.numpy(), p, atol=0.015)
    assert np.allclose(weight.numpy(), 1 / (4 * p[t.numpy()]), rtol=1e-6)


@pytest.mark.parametrize("command", ["train", "train-classifier", "train-upsampler"])
def test_help_names_the_fp16_mapping(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--precision fp16" in text and "--batch_size" in text and "--batch-size" in text
