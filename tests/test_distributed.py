"""torchrun helpers (admkit.distributed), and a 2-process gloo run against one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from admkit import checkpoint as ckpt
from admkit import distributed
from admkit.errors import UserError
from admkit.runlog import read_log

SCRIPT = Path(__file__).parent / "toy_train.py"
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_launch_env_reads_torchrun_variables(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_env() == distributed.LaunchEnv(rank=0, world_size=1, local_rank=0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launch_env() == distributed.LaunchEnv(rank=3, world_size=4, local_rank=1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UserError, match="RANK=4 and WORLD_SIZE=4"):
        distributed.launch_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        distributed.launch_env()


def test_single_process_helpers_are_identities(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main_process()
    value = torch.tensor([1.5, -2.0])
    assert torch.equal(distributed.all_reduce_mean_(value.clone()), value)
    assert torch.equal(distributed.all_reduce_sum_(value.clone()), value)
    assert torch.equal(distributed.all_gather_cat(value), value)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.teardown()


def test_device_selection(monkeypatch):
    assert distributed.select_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        distributed.select_device("tpu-please")
    if not torch.cuda.is_available():
        assert distributed.select_device() == torch.device("cpu")
        with pytest.raises(UserError, match="CUDA is not available"):
            distributed.select_device("cuda")


@pytest.fixture
def default_sigint():
    """Python's default SIGINT handler for the test, and the previous one back afterwards.

    A process started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
    ignored, and Python then keeps SIG_IGN instead of installing its default handler: pytest
    launched that way (as a CI script may launch it) starts with SIGINT ignored,
    StopRequest rightly puts SIG_IGN back after the first Ctrl-C, and the second one does not
    raise."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_stop_request_turns_ctrl_c_into_a_flag(default_sigint):
    with distributed.StopRequest() as stop:
        assert not stop.agreed(torch.device("cpu"))
        signal.raise_signal(signal.SIGINT)  # would raise KeyboardInterrupt without the handler
        assert stop.agreed(torch.device("cpu"))
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C interrupts at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_exit_process_flushes_and_returns_the_code(tmp_path):
    # Piped standard streams are block-buffered: without the flush, os._exit would drop both.
    script = (
        "import sys; from admkit.distributed import exit_process; "
        "print('written', end=''); sys.stderr.write('warned'); exit_process(3)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=120
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, b"written", b"warned")


@pytest.mark.parametrize(
    "argv, code, text",
    [
        (["presets"], 0, "imagenet64"),
        (["presets", "no-such-preset"], 2, "no-such-preset"),
        (["sample"], 2, "required"),  # argparse's usage error: SystemExit(2)
        (["--help"], 0, "usage"),
    ],
)
def test_command_under_torchrun_exits_with_its_code_and_output(argv, code, text, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARIABLES, "PYTHONUNBUFFERED")}
    env |= {"WORLD_SIZE": "2", "RANK": "1"}  # the variables torchrun sets; no group is joined
    command = [sys.executable, "-m", "admkit", *argv]
    result = subprocess.run(command, env=env, capture_output=True, timeout=120, text=True)
    assert result.returncode == code, result.stderr[-2000:]
    assert text in result.stdout + result.stderr


def _run(command: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=180)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()[-3000:]


def test_two_process_torchrun_matches_one_process(tmp_path):
    common = ["--steps", "4", "--batch_size", "8", "--save_interval", "4"]
    _run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "one"), *common], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--standalone", str(SCRIPT), "--check_collectives"]
    # Micro-batches of 2 on each rank: DDP's no_sync path must still average over all 8.
    _run([*torchrun, "--out", str(tmp_path / "two"), *common, "--microbatch", "2"], tmp_path)
    one = ckpt.latest_checkpoint(tmp_path / "one")
    two = ckpt.latest_checkpoint(tmp_path / "two")
    assert ckpt.checkpoint_step(two) == 4
    for name in ("model", "ema_0.9", "ema_0.5"):
        a, b = ckpt.read_weights(one, name), ckpt.read_weights(two, name)
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), (name, key)
    # The logged loss is the mean over both processes' halves of the batch; the gradient norm
    # shows the gradients themselves match (Adam alone would hide a constant factor).
    for key in ("loss", "grad_norm"):
        values_one = [r[key] for r in read_log(tmp_path / "one")]
        values_two = [r[key] for r in read_log(tmp_path / "two")]
        assert values_two == pytest.approx(values_one, rel=1e-5), key
    # Only rank 0 wrote, and both processes' RNG states are in the checkpoint.
    assert len(ckpt.read_training_state(two)["rng"]) == 2
