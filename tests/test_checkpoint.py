"""Run directories, atomic checkpoints and safe weight loading (checkpoint.py, weights.py)."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import safetensors.torch
import torch

from admkit import checkpoint as ckpt
from admkit import weights
from admkit.errors import UserError


def _weights(value: float) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "model": {"w": torch.full((2, 3), value), "b": torch.arange(3.0) + value},
        "ema_0.9": {"w": torch.full((2, 3), -value), "b": torch.zeros(3)},
    }


def _save(run, step, value=None, **kwargs):
    value = float(step) if value is None else value
    state = {"step": step, "optimizer": {"state": {0: {"m": torch.ones(2) * value}}}}
    return ckpt.save_checkpoint(run, step, _weights(value), state, **kwargs)


def test_checkpoint_round_trip(tmp_path):
    path = _save(tmp_path, 7, value=2.5)
    assert path == tmp_path / "checkpoints" / "step_000007"
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert ckpt.checkpoint_step(path) == 7
    assert ckpt.weight_names(path) == ["model", "ema_0.9"]
    for name, expected in _weights(2.5).items():
        loaded = ckpt.read_weights(path, name)
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    state = ckpt.read_training_state(path)
    assert state["step"] == 7
    assert torch.equal(state["optimizer"]["state"][0]["m"], torch.full((2,), 2.5))
    # A run directory's default weights are its first EMA, as SPEC §2.5 asks of `sample`.
    assert torch.equal(ckpt.run_weights(tmp_path)["w"], torch.full((2, 3), -2.5))
    assert torch.equal(weights.read_state_dict(tmp_path, "model")["w"], torch.full((2, 3), 2.5))
    with pytest.raises(UserError, match="ema_0.5"):
        ckpt.read_weights(path, "ema_0.5")


def test_training_state_must_be_plain_data(tmp_path):
    with pytest.raises(TypeError, match="not plain data"):
        ckpt.save_checkpoint(tmp_path, 1, _weights(1.0), {"sampler": object()})
    assert ckpt.latest_checkpoint(tmp_path) is None


def test_crash_before_the_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 3)

    def crash(partial, final):
        raise OSError("simulated crash between writing the files and the final rename")

    monkeypatch.setattr(ckpt, "_commit", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 6)
    assert not (tmp_path / "checkpoints" / "step_000006").exists()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert torch.equal(ckpt.read_weights(good)["w"], torch.full((2, 3), 3.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003"]


def test_leftovers_of_a_killed_writer_are_never_picked(tmp_path):
    good = _save(tmp_path, 3)
    root = tmp_path / "checkpoints"
    # What SIGKILL can leave: a half-written scratch folder (before the rename) ...
    partial = root / ".partial-step_000009-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    # ... and, from damage after the fact, a step folder without a manifest or with a short file.
    (root / "step_000008").mkdir()
    (root / "step_000008" / "model.safetensors").write_bytes(b"junk")
    damaged = _save(tmp_path, 7)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.list_checkpoints(tmp_path) == [good]
    # The next writer clears the scratch folder and replaces the damaged step folder.
    _save(tmp_path, 8)
    assert not partial.exists()
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_000008"


def test_existing_checkpoint_needs_overwrite(tmp_path):
    _save(tmp_path, 4, value=1.0)
    with pytest.raises(UserError, match="already exists"):
        _save(tmp_path, 4, value=2.0)
    assert torch.equal(
        ckpt.read_weights(tmp_path / "checkpoints" / "step_000004")["b"][:1], torch.ones(1)
    )
    _save(tmp_path, 4, value=2.0, overwrite=True)
    path = ckpt.latest_checkpoint(tmp_path)
    assert torch.equal(ckpt.read_weights(path)["w"], torch.full((2, 3), 2.0))


def test_keep_prunes_old_checkpoints_but_never_the_newest_complete(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    # An unfinished newer folder does not count: the newest complete one stays.
    (tmp_path / "checkpoints" / "step_000005").mkdir()
    ckpt.prune_checkpoints(tmp_path, 1)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [4]
    with pytest.raises(UserError, match="--keep 0"):
        ckpt.prune_checkpoints(tmp_path, 0)


def test_atomic_path_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "samples.npz"
    ckpt.atomic_write_text(target, "old")
    with pytest.raises(UserError, match="--overwrite"):
        ckpt.atomic_write_text(target, "new")
    with pytest.raises(RuntimeError):
        with ckpt.atomic_path(target, overwrite=True) as temporary:
            assert temporary.suffix == ".npz"
            temporary.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


def test_prepare_run_dir_resumes_refuses_and_overwrites(tmp_path):
    run = tmp_path / "run"
    config = {"model": {"num_channels": 32}, "train": {"lr": 1e-4, "steps": 10}}
    ckpt.prepare_run_dir(run, config)
    assert ckpt.read_config(run) == config
    # Same run again (more steps allowed): resumes, and the new step count is stored.
    longer = {"model": {"num_channels": 32}, "train": {"lr": 1e-4, "steps": 20}}
    ckpt.prepare_run_dir(run, longer, may_differ=("train.steps",))
    assert ckpt.read_config(run)["train"]["steps"] == 20
    changed = {"model": {"num_channels": 64}, "train": {"lr": 1e-4, "steps": 20}}
    with pytest.raises(UserError, match=r"model\.num_channels: 32 -> 64.*--overwrite"):
        ckpt.prepare_run_dir(run, changed, may_differ=("train.steps",))
    _save(run, 5)
    (run / "notes.txt").write_text("mine")
    ckpt.prepare_run_dir(run, changed, overwrite=True)
    assert ckpt.read_config(run) == changed
    assert ckpt.latest_checkpoint(run) is None
    assert (run / "notes.txt").read_text() == "mine"


def test_prepare_run_dir_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not an admkit run directory"):
        ckpt.prepare_run_dir(tmp_path, {"a": 1})
    with pytest.raises(UserError, match="is a file"):
        ckpt.prepare_run_dir(tmp_path / "photo.png", {"a": 1})


class _Payload:
    """Unpickling this would create a file: the test checks that it never happens."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_cannot_run_code(tmp_path, writer):
    # The payload is live: plain unpickling does create its file.
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Payload(armed))).close()
    assert armed.exists()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": torch.zeros(2), "trap": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(UserError, match="could run code"):
        weights.read_state_dict(path)
    with pytest.raises(UserError, match="could run code"):
        weights.load_released_checkpoint(path, torch.nn.Linear(2, 2))
    assert not marker.exists()


def test_strict_load_names_the_differences(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"] = torch.zeros(5, 4)  # shape mismatch
    del state["0.bias"]  # missing
    state["label_emb.weight"] = torch.zeros(10, 4)  # unexpected
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(UserError) as error:
        weights.load_released_checkpoint(path, model)
    message = str(error.value)
    assert "missing keys: 0.bias" in message
    assert "unexpected keys: label_emb.weight" in message
    assert "1.weight [5, 4] vs model [2, 4]" in message
    assert "\n" not in message
    seen = {}

    def suggest(state_dict):
        seen["keys"] = sorted(state_dict)
        return "imagenet64"

    with pytest.raises(UserError, match="--preset imagenet64"):
        weights.load_released_checkpoint(path, model, suggest_preset=suggest)
    assert "label_emb.weight" in seen["keys"]


def test_released_pt_and_safetensors_load_exactly(tmp_path):
    source = torch.nn.Linear(3, 4)
    target = torch.nn.Linear(3, 4)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    safetensors.torch.save_file(source.state_dict(), tmp_path / "model.safetensors")
    for name in ("model.pt", "model.safetensors"):
        torch.nn.init.zeros_(target.weight)
        weights.load_released_checkpoint(tmp_path / name, target)
        assert torch.equal(target.weight, source.weight)


def test_unreadable_files_are_user_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot read"):
        weights.read_state_dict(cut)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="cannot read"):
        weights.read_state_dict(broken)
    with pytest.raises(UserError, match="does not exist"):
        weights.read_state_dict(tmp_path / "missing.pt")
    # Random bytes and text are damaged files, not refused objects.
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 4)
    text = tmp_path / "text.pt"
    text.write_text("hello, this is not a checkpoint")
    for path in (noise, text):
        with pytest.raises(UserError, match="cannot read") as error:
            weights.read_state_dict(path)
        assert "could run code" not in str(error.value)
    nested = tmp_path / "nested.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, nested)
    with pytest.raises(UserError, match="not a state dict"):
        weights.read_state_dict(nested)


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's state
    state = ckpt.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]


def test_manifest_lists_every_file(tmp_path):
    path = _save(tmp_path, 2)
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = {p.name: p.stat().st_size for p in path.iterdir() if p.name != "manifest.json"}
    assert manifest["files"] == on_disk
    assert manifest["step"] == 2
