"""The training loop (admkit.train) on a toy MLP: optimisation, EMA, precision, resume, logging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from admkit import checkpoint as ckpt
from admkit.errors import UserError
from admkit.gradients import forward_backward
from admkit.runlog import read_log
from admkit.train import EMA, TrainConfig, train
from toy_train import T, noisy_loss, plain_loss, toy_batches, toy_model

SCRIPT = Path(__file__).parent / "toy_train.py"


def _config(**overrides) -> TrainConfig:
    options = dict(steps=6, batch_size=8, lr=1e-2, ema_rates=(0.9, 0.5), log_interval=1)
    options |= {"save_interval": 3} | overrides
    return TrainConfig(**options)


def _run(run_dir, loss_fn=noisy_loss, batches=None, model=None, **overrides):
    model = model if model is not None else toy_model(dropout=0.1)
    config = _config(**overrides)
    batches = batches or toy_batches(config.batch_size)
    train(model, loss_fn, batches, config, run_dir, run_config={"toy": "mlp"}, progress=False)
    return model


def _final_weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    latest = ckpt.latest_checkpoint(run_dir)
    return {name: ckpt.read_weights(latest, name) for name in ckpt.weight_names(latest)}


def _assert_identical(a, b) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}/{key} differs"


def test_loss_decreases_and_the_run_directory_is_complete(tmp_path):
    _run(tmp_path, plain_loss, steps=60, log_interval=10, save_interval=30, ema_rates=(0.99,))
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert records[-1]["loss"] < 0.3 * records[0]["loss"]
    for key in ("samples", "lr", "grad_norm", "images_per_s", "skipped_steps"):
        assert key in records[-1]
    assert records[-1]["samples"] == 60 * 8
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["toy"] == "mlp" and config["train"]["steps"] == 60
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [30, 60]


def test_the_batch_source_is_closed_when_training_returns(tmp_path):
    # A source that holds loading processes must stop when train() returns, not whenever
    # garbage collection reaches it: here the test itself keeps the generator referenced.
    opened, closed = [], []

    def batches(start_step: int):
        def generate():
            try:
                yield from toy_batches(8)(start_step)
            finally:
                closed.append(start_step)

        opened.append(generate())
        return opened[-1]

    _run(tmp_path, plain_loss, batches=batches, steps=4)
    assert closed == [0]
    _run(tmp_path, plain_loss, batches=batches, steps=6)  # resumes at step 4
    assert closed == [0, 4]


def test_loss_is_logged_by_timestep_quartile(tmp_path):
    def loss_of_t(model, batch, generator):
        t = torch.arange(8) % T  # two examples in each quartile: {0, 1}, {2, 3}, {4, 5}, {6, 7}
        tied = 0.0 * model(batch["x"]).sum(dim=1)  # keeps the graph so backward runs
        return {"loss": t.float() + tied, "t": t, "num_timesteps": T}

    _run(tmp_path, loss_of_t, steps=2, log_interval=2, save_interval=2)
    (record,) = read_log(tmp_path)
    assert record["loss"] == 3.5
    assert [record[f"loss_q{q}"] for q in range(4)] == [0.5, 2.5, 4.5, 6.5]


def test_microbatches_average_to_the_full_batch_gradient():
    batch = next(toy_batches(8)(0))
    batch["w"] = torch.linspace(0.5, 2.0, 8)

    def weighted(model, batch, generator):
        return plain_loss(model, batch, generator) | {"weight": batch["w"]}

    model = toy_model()
    params = list(model.parameters())
    # Closed form by autograd, independently of forward_backward: d/dθ mean_i(w_i L_i).
    per_example = ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)
    expected = torch.autograd.grad((batch["w"] * per_example).mean(), params)
    for microbatch in (0, 3, 1):
        model.zero_grad()
        terms = forward_backward(model, weighted, batch, microbatch=microbatch)
        assert terms["loss"].shape == (8,)
        for p, g in zip(params, expected):
            assert torch.allclose(p.grad, g, atol=1e-7, rtol=1e-5), microbatch


def test_microbatch_training_matches_full_batch(tmp_path):
    _run(tmp_path / "full", plain_loss, model=toy_model(), steps=3)
    _run(tmp_path / "micro", plain_loss, model=toy_model(), steps=3, microbatch=3)
    full, micro = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "micro")
    # Adam would hide a constant factor on the gradients; their logged norm does not.
    norms = [[r["grad_norm"] for r in read_log(tmp_path / run)] for run in ("full", "micro")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    for name in full:
        for key in full[name]:
            assert torch.allclose(full[name][key], micro[name][key], atol=1e-6), (name, key)


def test_ema_class_matches_its_closed_form():
    model = torch.nn.Linear(2, 1, bias=False)
    rate = 0.9
    values = [1.0, 3.0, -2.0, 5.0]
    with torch.no_grad():
        model.weight.fill_(values[0])
        ema = EMA(model, (rate,))
        for value in values[1:]:
            model.weight.fill_(value)
            ema.update(model)
    k = len(values) - 1
    # θ̄_k = r^k θ_0 + (1 - r) Σ_{j=1..k} r^(k-j) θ_j
    closed = rate**k * values[0] + (1 - rate) * sum(
        rate ** (k - j) * values[j] for j in range(1, k + 1)
    )
    assert torch.allclose(ema.state_dict(model, rate)["weight"], torch.full((1, 2), closed))
    assert ema.averages[rate][0].dtype == torch.float32


def test_ema_in_the_loop_follows_the_formula(tmp_path):
    model = toy_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    _run(tmp_path, plain_loss, model=model, steps=3, save_interval=1, ema_rates=(0.5, 1.0, 0.0))
    previous = initial
    for checkpoint in ckpt.list_checkpoints(tmp_path):
        theta = ckpt.read_weights(checkpoint, "model")
        average = ckpt.read_weights(checkpoint, "ema_0.5")
        for key in theta:
            expected = 0.5 * previous[key] + 0.5 * theta[key]
            assert torch.allclose(average[key], expected, rtol=1e-6, atol=0)
        assert all(
            torch.equal(ckpt.read_weights(checkpoint, "ema_1.0")[k], initial[k]) for k in theta
        )
        assert all(
            torch.equal(ckpt.read_weights(checkpoint, "ema_0.0")[k], theta[k]) for k in theta
        )
        previous = average


def test_learning_rate_is_annealed_linearly_and_applied(tmp_path):
    _run(tmp_path / "anneal", plain_loss, steps=4, lr=0.1, lr_anneal_steps=4, save_interval=4)
    lrs = [r["lr"] for r in read_log(tmp_path / "anneal")]
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025], rel=1e-12)
    # Adam's first step moves every parameter by lr * g / (|g| + eps), that is by lr.
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    _run(tmp_path / "one", plain_loss, model=model, steps=1, lr=0.01, save_interval=1)
    for old, new in zip(before, model.parameters()):
        assert torch.allclose((new.detach() - old).abs(), torch.full_like(old, 0.01), rtol=1e-3)


def _poisoned_batches(poison_step):
    source = toy_batches(8)

    def batches(start_step):
        for step, batch in enumerate(source(start_step), start_step):
            yield batch | {"poison": torch.full((8,), step == poison_step)}

    return batches


def _poisonable_loss(model, batch, generator):
    prediction = model(batch["x"])
    if batch["poison"].any():
        prediction = prediction * float("inf")  # every gradient becomes inf or NaN
    return {"loss": ((prediction.float() - batch["y"]) ** 2).mean(dim=1)}


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_non_finite_step_is_skipped_and_logged(tmp_path, precision):
    model = toy_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _poisoned_batches(poison_step=1)  # the second step
    _run(tmp_path, _poisonable_loss, batches, model, steps=3, save_interval=1, precision=precision)
    one, two, three = [
        {name: ckpt.read_weights(c, name) for name in ckpt.weight_names(c)}
        for c in ckpt.list_checkpoints(tmp_path)
    ]
    assert not torch.equal(one["model"]["0.weight"], initial["0.weight"])  # step 1 applied
    _assert_identical(one, two)  # step 2 skipped: weights and every EMA unchanged
    assert not torch.equal(three["model"]["0.weight"], two["model"]["0.weight"])
    records = read_log(tmp_path)
    assert [r["skipped_steps"] for r in records] == [0, 1, 0]
    assert records[-1]["skipped_total"] == 1
    assert all(torch.isfinite(v).all() for v in three["model"].values())
    if precision == "fp16":
        assert records[1]["loss_scale"] < records[0]["loss_scale"]
    state = ckpt.read_training_state(ckpt.latest_checkpoint(tmp_path))
    assert state["skipped_steps"] == 1 and state["step"] == 3


def test_bf16_trains(tmp_path):
    model = toy_model()
    before = model[0].weight.detach().clone()
    _run(tmp_path, noisy_loss, model=model, steps=3, precision="bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(tmp_path))
    assert not torch.equal(model[0].weight.detach(), before)


class _CountingLoss:
    """The noisy toy loss with state (examples seen) that changes the loss, and a Ctrl-C trigger."""

    def __init__(self, interrupt_at_call: int | None = None):
        self.seen = 0
        self.calls = 0
        self.interrupt_at_call = interrupt_at_call

    def __call__(self, model, batch, generator):
        self.calls += 1
        if self.calls == self.interrupt_at_call:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of a step
        terms = noisy_loss(model, batch, generator)
        return terms | {"loss": terms["loss"] * (1.0 + 1e-2 * self.seen)}

    def observe(self, terms):
        self.seen += len(terms["loss"])

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_ctrl_c_saves_at_the_step_boundary_and_resume_is_exact(tmp_path):
    reference = _CountingLoss()
    _run(tmp_path / "reference", reference, steps=8, save_interval=4)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", _CountingLoss(interrupt_at_call=3), steps=8, save_interval=4)
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path / "run")) == 3
    resumed = _CountingLoss()
    _run(tmp_path / "run", resumed, steps=8, save_interval=4)
    assert resumed.seen == reference.seen == 8 * 8
    _assert_identical(_final_weights(tmp_path / "run"), _final_weights(tmp_path / "reference"))
    steps = [r["step"] for r in read_log(tmp_path / "run")]
    assert steps == list(range(1, 9))
    losses = [r["loss"] for r in read_log(tmp_path / "run")]
    assert losses == [r["loss"] for r in read_log(tmp_path / "reference")]


def test_a_failed_checkpoint_write_is_not_resumed_from(tmp_path, monkeypatch):
    _run(tmp_path / "reference", steps=6, save_interval=2)
    real_commit, commits = ckpt._commit, []

    def dies_on_second_commit(partial, final):
        commits.append(final)
        if len(commits) == 2:
            raise OSError("killed while publishing the checkpoint")
        real_commit(partial, final)

    monkeypatch.setattr(ckpt, "_commit", dies_on_second_commit)
    with pytest.raises(OSError, match="killed while publishing"):
        _run(tmp_path / "run", steps=6, save_interval=2)
    monkeypatch.setattr(ckpt, "_commit", real_commit)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000002"]
    _run(tmp_path / "run", steps=6, save_interval=2)
    _assert_identical(_final_weights(tmp_path / "run"), _final_weights(tmp_path / "reference"))


def test_keep_prunes_during_training(tmp_path):
    _run(tmp_path, steps=6, save_interval=1, keep=2)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [5, 6]


def test_other_options_are_refused_more_steps_resume_overwrite_restarts(tmp_path):
    _run(tmp_path, steps=2)
    with pytest.raises(UserError, match=r"train\.lr: 0\.01 -> 0\.02"):
        _run(tmp_path, steps=2, lr=0.02)
    _run(tmp_path, steps=4)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    model = toy_model(dropout=0.1)
    config = _config(steps=1, lr=0.02)
    train(model, noisy_loss, toy_batches(8), config, tmp_path, overwrite=True, progress=False)
    assert [r["step"] for r in read_log(tmp_path)] == [1]
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [1]


def test_compile_failure_falls_back_to_eager_with_the_same_result(tmp_path, monkeypatch):
    _run(tmp_path / "eager", steps=3)

    class Uncompilable(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            raise RuntimeError("no working compiler here")

    monkeypatch.setattr(torch, "compile", Uncompilable)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        _run(tmp_path / "compiled", steps=3, compile=True)
    _assert_identical(_final_weights(tmp_path / "compiled"), _final_weights(tmp_path / "eager"))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lr_anneal_steps": 3}, "lr_anneal_steps"),
        ({"precision": "fp8"}, "precision"),
        ({"ema_rates": (1.5,)}, "ema_rate"),
        ({"steps": 0}, "--steps"),
        ({"keep": 0}, "--keep"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        _config(**options)


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

    def start(run_dir, *extra):
        command = [sys.executable, str(SCRIPT), "--out", str(run_dir), "--noisy", *extra]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish(process):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode()[-2000:]

    finish(start(tmp_path / "reference"))
    run_dir = tmp_path / "run"
    process = start(run_dir, "--sleep", "0.25")
    deadline = time.monotonic() + 60
    # Kill after a checkpoint and a log record past it: the resumed run must drop that record.
    while ckpt.latest_checkpoint(run_dir) is None or not any(
        r["step"] > ckpt.checkpoint_step(ckpt.latest_checkpoint(run_dir)) for r in read_log(run_dir)
    ):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.kill()  # SIGKILL: no chance to clean up
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_at = ckpt.checkpoint_step(ckpt.latest_checkpoint(run_dir))
    assert killed_at < 12
    finish(start(run_dir))
    _assert_identical(_final_weights(run_dir), _final_weights(tmp_path / "reference"))
    resumed, reference = read_log(run_dir), read_log(tmp_path / "reference")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
