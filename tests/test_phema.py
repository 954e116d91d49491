"""Post-hoc EMA (admkit.phema, --phema, admkit ema): closed forms, reconstruction against the raw
training weights, exact resume, bad input, and the files end to end on a tiny model."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from scipy.integrate import quad

from admkit import checkpoint as ckpt
from admkit import phema
from admkit.cli import main
from admkit.cli.models import load_model
from admkit.errors import UserError
from admkit.phema import (
    MAX_SIGMA_REL,
    PowerFunctionEMA,
    Solver,
    gamma_from_sigma_rel,
    gram,
    reconstructed_step_weights,
    sigma_rel_from_gamma,
    step_weights,
)
from admkit.train import TrainConfig, train
from toy_train import toy_batches, toy_model

EPS32 = 2.0**-24  # float32 unit roundoff
TINY = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1"]
QUIET = ["--num_workers", "0", "--seed", "3"]
STEPS, EVERY = 24, 4  # the toy run: raw weights at every step, snapshots every 4


def _mse(model, batch, generators):
    return {"loss": ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)}


def _toy_run(run_dir, model=None, **overrides):
    options = dict(steps=STEPS, batch_size=8, lr=1e-2, ema_rates=(), log_interval=100)
    options |= dict(save_interval=1, phema=("0.05", "0.10"), snapshot_interval=EVERY) | overrides
    config = TrainConfig(**options)
    model = model if model is not None else toy_model()
    train(model, _mse, toy_batches(8), config, run_dir, run_config={"toy": "mlp"}, progress=False)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("phema") / "run"
    _toy_run(run_dir)
    return run_dir


def _ema(capsys, *argv) -> tuple[int, str, list[str]]:
    code = main(["ema", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _metadata(path) -> dict[str, str]:
    with safetensors.safe_open(path, "pt") as file:
        return file.metadata()


# -- the math ------------------------------------------------------------------------------------


def test_sigma_rel_and_gamma_match_the_paper_and_invert():
    # EDM2's pairs (σ_rel 0.05 ↔ γ 16.97, 0.07 ↔ 11.24, 0.10 ↔ 6.94), to their printed digits.
    for sigma_rel, gamma in [(0.05, 16.97), (0.07, 11.24), (0.10, 6.94)]:
        assert gamma_from_sigma_rel(sigma_rel) == pytest.approx(gamma, abs=0.005)
    for sigma_rel in np.geomspace(1e-4, MAX_SIGMA_REL * (1 - 1e-6), 50):
        gamma = gamma_from_sigma_rel(sigma_rel)
        assert gamma > 0 and sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert sigma_rel_from_gamma(0.0) == pytest.approx(MAX_SIGMA_REL, rel=1e-15)
    for bad in (0.0, -0.1, MAX_SIGMA_REL, 0.5):
        with pytest.raises(ValueError):
            gamma_from_sigma_rel(bad)


def test_step_weights_are_the_profile_integrated_over_each_step():
    t, gamma = 7, 3.3
    profile = lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1)  # noqa: E731
    integrals = [quad(profile, k - 1, k)[0] for k in range(1, t + 1)]
    np.testing.assert_allclose(step_weights(t, gamma), integrals, rtol=1e-12, atol=1e-15)
    assert step_weights(t, gamma).sum() == pytest.approx(1.0, rel=1e-14)
    assert step_weights(t, gamma, 10)[t:].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "t_a, gamma_a, t_b, gamma_b", [(5, 2.0, 9, 7.5), (9, 7.5, 5, 2.0), (6, 1.0, 6, 16.0)]
)
def test_gram_is_the_inner_product_of_two_profiles(t_a, gamma_a, t_b, gamma_b):
    def product(tau):
        p_a = (gamma_a + 1) * tau**gamma_a / t_a ** (gamma_a + 1)
        p_b = (gamma_b + 1) * tau**gamma_b / t_b ** (gamma_b + 1)
        return p_a * p_b

    expected = quad(product, 0, min(t_a, t_b), epsabs=0, epsrel=1e-13)[0]
    assert float(gram(t_a, gamma_a, t_b, gamma_b)) == pytest.approx(expected, rel=1e-10)


def test_power_function_ema_equals_its_closed_form():
    # θ_k = the k-th value; after t updates θ̂_t = Σ_k w_k θ_k,
    # w_k = (k^(γ+1) - (k-1)^(γ+1)) / t^(γ+1).
    values = [3.0, -1.0, 4.0, 1.5, -5.0, 9.0, 2.0, 6.0, -5.0, 3.5, 5.0, -8.0]
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(100.0)  # the initial weights get no weight at all (β_1 = 0)
        tracked = PowerFunctionEMA(model, ("0.05", "0.2"))
        for t, value in enumerate(values, start=1):
            model.weight.fill_(value)
            tracked.update(model, t)
    t = len(values)
    for label in ("0.05", "0.2"):
        g = gamma_from_sigma_rel(float(label))
        closed = sum((k ** (g + 1) - (k - 1) ** (g + 1)) * v for k, v in enumerate(values, 1))
        closed /= t ** (g + 1)
        average = tracked.state_dict(model, label)["weight"]
        assert average.dtype == torch.float32
        # t float32 updates, each within a few units of rounding of max |θ|.
        assert torch.allclose(
            average.double(),
            torch.full((1, 2), closed, dtype=torch.float64),
            rtol=0,
            atol=4 * t * EPS32 * 9.0,
        )
    # The two profiles weigh the steps differently, so the check above tells them apart.
    difference = tracked.averages["0.05"][0] - tracked.averages["0.2"][0]
    assert difference.abs().min() > 0.1


def test_solver_returns_a_tracked_profile_and_fits_others_with_coefficients_summing_to_one():
    t = [s for s in range(EVERY, STEPS + 1, EVERY) for _ in range(2)]
    gammas = [gamma_from_sigma_rel(s) for _ in range(STEPS // EVERY) for s in (0.05, 0.10)]
    solver = Solver(t, gammas)
    exact = solver.solve(STEPS, gammas[-2])
    assert exact.residual < 1e-7
    np.testing.assert_allclose(exact.coefficients, np.eye(len(t))[-2], atol=1e-9)
    between = solver.solve(STEPS, gamma_from_sigma_rel(0.07))
    assert between.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
    # The residual is the distance of the discrete weightings' continuous profiles: it bounds
    # the distance of the weightings themselves (each weight is an integral over one step).
    made = reconstructed_step_weights(t, gammas, between.coefficients, STEPS)
    target = step_weights(STEPS, between.gamma)
    norm = math.sqrt(float(gram(STEPS, between.gamma, STEPS, between.gamma)))
    assert 0 < np.linalg.norm(made - target) <= between.residual * norm
    assert 1e-3 < between.residual < 0.05


# -- reconstruction on a toy run -------------------------------------------------------------------


def test_reconstructing_a_tracked_sigma_rel_gives_back_its_tracked_weights(
    toy_run, tmp_path, capsys
):
    out = tmp_path / "out"
    for step in (12, STEPS):
        code, stdout, err = _ema(
            capsys, toy_run, "--sigma_rel", "0.05", "--step", step, "--out", out, "--overwrite"
        )
        assert code == 0, err
        made = safetensors.torch.load_file(out / "phema_0.05.safetensors")
        tracked = ckpt.read_weights(ckpt.list_checkpoints(toy_run)[step - 1], "phema_0.05")
        coefficients = json.loads(_metadata(out / "phema_0.05.safetensors")["coefficients"])
        assert coefficients[-2][:2] == [step, "0.05"]
        # The float64 solve gives x = e_j to ~1e-14 (the Gram matrix's condition number, ~3e2,
        # times n float64 roundings); the float64 sum then rounds once, to float32: half a
        # float32 ulp, plus the other coefficients' share of weights of similar size.
        others = sum(abs(x) for *_, x in coefficients[:-2] + coefficients[-1:])
        assert others < 1e-12 and abs(coefficients[-2][2] - 1) < 1e-12
        for key, value in tracked.items():
            bound = EPS32 * value.abs() + 1e-12 * value.abs().max()
            assert ((made[key] - value).abs() <= bound).all(), key
    assert "relative residual" in stdout and "phema_0.05.safetensors" in stdout


def test_a_profile_between_the_tracked_ones_matches_the_exact_average_of_the_raw_weights(
    toy_run, tmp_path, capsys
):
    code, _, err = _ema(capsys, toy_run, "--sigma_rel", "0.07", "--out", tmp_path)
    assert code == 0, err
    made = safetensors.torch.load_file(tmp_path / "phema_0.07.safetensors")
    metadata = _metadata(tmp_path / "phema_0.07.safetensors")
    gamma, gain = float(metadata["gamma"]), float(metadata["gain"])
    checkpoints = ckpt.list_checkpoints(toy_run)
    assert [ckpt.checkpoint_step(c) for c in checkpoints] == list(range(1, STEPS + 1))
    raw = [ckpt.read_weights(c, "model") for c in checkpoints]  # θ_1 .. θ_T
    w = torch.from_numpy(step_weights(STEPS, gamma))
    profiles = json.loads(metadata["coefficients"])
    q = torch.from_numpy(
        reconstructed_step_weights(
            [s for s, *_ in profiles],
            [gamma_from_sigma_rel(float(label)) for _, label, _ in profiles],
            np.array([x for *_, x in profiles]),
            STEPS,
        )
    )
    # |Σ_k (q_k - w_k) θ_k| = |Σ_k (q_k - w_k)(θ_k - mean)| <= ||q - w|| ||θ - mean|| per
    # parameter (both weightings sum to 1), plus rounding: the tracked averages' float32 updates
    # (t of them, each within 2 units of rounding of max |θ|), amplified by Σ|x_i|.
    distance = float(torch.linalg.vector_norm(q - w))
    # The reported residual is honest: ||q - w|| <= ||Σ x_i p_i - p_r|| (Jensen, each weight
    # being the profile's integral over one step), ||p_r||² = (γ+1)² / ((2γ+1) t).
    norm = (gamma + 1) / math.sqrt((2 * gamma + 1) * STEPS)
    assert 0 < distance <= float(metadata["residual"]) * norm
    closer_than = []
    for key in made:
        theta = torch.stack([r[key].double() for r in raw])  # [T, ...]
        exact = torch.tensordot(w, theta, dims=1)
        spread = torch.linalg.vector_norm(theta - theta.mean(0), dim=0)
        rounding = (2 * gain * STEPS + 1) * 2 * EPS32 * theta.abs().amax(0)
        error = (made[key].double() - exact).abs()
        assert (error <= distance * spread + rounding).all(), key
        tracked_errors = [
            (ckpt.read_weights(checkpoints[-1], name)[key].double() - exact).norm()
            for name in ("phema_0.05", "phema_0.10")
        ]
        closer_than.append((error.norm(), *tracked_errors))
    made_error, error_05, error_10 = (
        sum(e**2 for e in column) ** 0.5 for column in zip(*closer_than)
    )
    assert made_error < 0.1 * min(error_05, error_10)


def test_resume_with_phema_is_bit_identical_weights_and_snapshots(tmp_path, monkeypatch):
    options = dict(steps=8, save_interval=3, snapshot_interval=2)
    _toy_run(tmp_path / "reference", model=toy_model(dropout=0.1), **options)
    real_commit, commits = ckpt._commit, []

    def dies_on_second_commit(partial, final):
        commits.append(final)
        if len(commits) == 2:
            raise OSError("killed while publishing the checkpoint")
        real_commit(partial, final)

    monkeypatch.setattr(ckpt, "_commit", dies_on_second_commit)
    run = tmp_path / "run"
    with pytest.raises(OSError, match="killed while publishing"):
        _toy_run(run, model=toy_model(dropout=0.1), **options)
    monkeypatch.setattr(ckpt, "_commit", real_commit)
    # Killed at step 6, after its snapshot and before its checkpoint: it resumes from step 3.
    assert [ckpt.snapshot_step(p) for p in ckpt.list_snapshots(run)] == [2, 4, 6]
    # What the crashed run left past step 3 is written again (4, 6) or removed (a stray 7).
    for name in ("step_000004.safetensors", "step_000007.safetensors"):
        safetensors.torch.save_file({"0.05/0.weight": torch.zeros(1)}, run / "snapshots" / name)
    _toy_run(run, model=toy_model(dropout=0.1), **options)

    reference, resumed = ckpt.latest_checkpoint(tmp_path / "reference"), ckpt.latest_checkpoint(run)
    assert ckpt.weight_names(resumed) == ["model", "phema_0.05", "phema_0.10"]
    for name in ckpt.weight_names(reference):
        expected, got = ckpt.read_weights(reference, name), ckpt.read_weights(resumed, name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
    snapshots = ckpt.list_snapshots(run)
    assert [ckpt.snapshot_step(p) for p in snapshots] == [2, 4, 6, 8]  # the stray 7 is gone
    for path, expected_path in zip(snapshots, ckpt.list_snapshots(tmp_path / "reference")):
        expected, got = (
            safetensors.torch.load_file(expected_path),
            safetensors.torch.load_file(path),
        )
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), path.name
        assert _metadata(path) == _metadata(expected_path)


def test_keep_leaves_snapshots_overwrite_removes_them_phema_cannot_change(tmp_path):
    run = tmp_path / "run"
    _toy_run(run, steps=6, save_interval=2, snapshot_interval=2, keep=1, snapshot_dtype="bf16")
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(run)] == [6]
    assert [ckpt.snapshot_step(p) for p in ckpt.list_snapshots(run)] == [2, 4, 6]
    snapshot = safetensors.torch.load_file(ckpt.list_snapshots(run)[0])
    assert {value.dtype for value in snapshot.values()} == {torch.bfloat16}
    assert json.loads((run / "config.json").read_text())["train"]["phema"] == ["0.05", "0.10"]
    with pytest.raises(UserError, match=r"train\.phema"):
        _toy_run(
            run,
            steps=8,
            save_interval=2,
            keep=1,
            phema=(),
            snapshot_interval=None,
            snapshot_dtype="fp32",
        )
    config = TrainConfig(steps=1, batch_size=8, ema_rates=())
    train(toy_model(), _mse, toy_batches(8), config, run, overwrite=True, progress=False)
    assert not (run / "snapshots").exists()
    # A run without --phema records none of its options, as runs made before they existed.
    assert "phema" not in json.loads((run / "config.json").read_text())["train"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"phema": ("0",)}, "sigma_rel '0' must be a number between 0 and 0.2887"),
        ({"phema": ("0.3",)}, "between 0 and 0.2887"),
        ({"phema": ("nan",)}, "between 0 and 0.2887"),
        ({"phema": ("fast",)}, "sigma_rel 'fast'"),
        ({"phema": ("0.1", "0.10")}, "lists sigma_rel 0.1 twice"),
        ({"snapshot_interval": 5}, "--snapshot_interval stores snapshots .* needs --phema"),
        ({"phema": ("0.05",), "snapshot_interval": 0}, "--snapshot_interval 0 must be at least 1"),
        ({"phema": ("0.05",), "snapshot_dtype": "fp8"}, "--snapshot_dtype 'fp8' must be one of"),
        ({"snapshot_dtype": "fp16"}, "--snapshot_dtype .* needs --phema"),
    ],
)
def test_bad_phema_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(steps=1, batch_size=1, **options)


# -- admkit ema: bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/nothing", "--sigma_rel", "0.05"], "is not an admkit run directory"),
        (
            ["{plain}", "--sigma_rel", "0.05"],
            "has no post-hoc EMA snapshots; train it with --phema",
        ),
        (
            ["{run}", "--sigma_rel", "0.25"],
            "0.25 cannot be made from the snapshots up to step 24 "
            r"\(relative residual .* > 0.05\); they can make sigma_rel 0.0\d+ to 0.1\d+$",
        ),
        (["{run}", "--sigma_rel", "0.3"], r"power-function EMAs reach 0.2887\); they can make"),
        (
            ["{run}", "--sigma_rel", "0.07", "--step", "5"],
            "--step 5 has no snapshot; .* has snapshots at steps 4, 8, 12, 16, 20, 24$",
        ),
        (["{run}", "--sigma_rel", "abc"], "--sigma_rel 'abc' is not a positive number"),
        (["{run}", "--sigma_rel", "0.04,-0.1"], "--sigma_rel '-0.1' is not a positive number"),
        (["{run}", "--sigma_rel", "0"], "--sigma_rel '0' is not a positive number"),
        (["{run}", "--sigma_rel", "0.05"], "holds phema_0.05 as the run tracked it; use --weights"),
        (
            [
                "{run}",
                "--sigma_rel",
                "0.07",
                "--step",
                "8",
                "--out",
                "{run}/checkpoints/step_000012",
            ],
            "is the checkpoint of step 12, but the profiles are made for step 8",
        ),
        (["{run}", "--sigma_rel", "0.07", "--out", "{plain}"], "belongs to another model"),
    ],
)
def test_ema_bad_input_is_one_line_error(toy_run, tmp_path, capsys, argv, message):
    plain = tmp_path / "plain"
    if "{plain}" in " ".join(argv):
        config = TrainConfig(steps=1, batch_size=8, ema_rates=())
        run_config = {"toy": "other"}
        train(
            toy_model(), _mse, toy_batches(8), config, plain, run_config=run_config, progress=False
        )
    paths = {"tmp": tmp_path, "run": toy_run, "plain": plain}
    code, _, err = _ema(capsys, *(a.format(**paths) for a in argv))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("admkit ema: error: ")
    assert re.search(message, err[0]), err[0]


def test_ema_refuses_to_overwrite_and_needs_out_without_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    _toy_run(run, steps=6, save_interval=3, snapshot_interval=2, keep=1)
    code, _, err = _ema(capsys, run, "--sigma_rel", "0.07", "--step", "4")
    assert code == 2 and len(err) == 1 and "no checkpoint at step 4" in err[0]
    assert "pass --out DIR" in err[0]
    code, _, err = _ema(capsys, run, "--sigma_rel", "0.07", "--plot")
    assert code == 0, err
    for argv in ([], ["--plot"]):
        code, _, err = _ema(capsys, run, "--sigma_rel", "0.07", *argv)
        assert code == 2 and len(err) == 1 and "already exists; pass --overwrite" in err[0]
    code, _, err = _ema(capsys, run, "--sigma_rel", "0.07", "--plot", "--overwrite")
    assert code == 0, err
    folder = ckpt.latest_checkpoint(run)
    assert (folder / "phema_profiles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The checkpoint stays complete: its manifest never listed the added files.
    assert ckpt.list_checkpoints(run) == [folder]
    assert ckpt.weight_names(folder) == ["model", "phema_0.05", "phema_0.10", "phema_0.07"]
    assert ckpt.weight_names(folder, added=False) == ["model", "phema_0.05", "phema_0.10"]


# -- end to end on a tiny diffusion model ----------------------------------------------------------


def test_train_ema_sample_and_init_from_end_to_end(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    train_args = ["train", "--data", "digits", "--out", str(run), *TINY, *QUIET]
    tracking = ["--batch_size", "4", "--save_interval", "3", "--phema", "0.05,0.10"]
    tracking += ["--snapshot_interval", "2", "--snapshot_dtype", "fp16"]
    assert main([*train_args, *tracking, "--steps", "6"]) == 0
    assert [ckpt.snapshot_step(p) for p in ckpt.list_snapshots(run)] == [2, 4, 6]
    capsys.readouterr()

    code, stdout, err = _ema(capsys, run, "--sigma_rel", "0.07,0.045")
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("sigma_rel 0.07 (gamma 11.245): step 6")
    folder = run / "checkpoints" / "step_000006"
    assert lines[1].endswith(str(folder / "phema_0.045.safetensors"))
    code, _, err = _ema(capsys, run, "--sigma_rel", "0.07", "--out", out)
    assert code == 0, err
    assert (out / "config.json").read_text() == (run / "config.json").read_text()

    # The same weights from the run, the checkpoint's file and the copy elsewhere.
    loaded = [
        load_model(run, "diffusion", weights="phema_0.07"),
        load_model(folder / "phema_0.07.safetensors", "diffusion"),
        load_model(out / "phema_0.07.safetensors", "diffusion"),
    ]
    states = [model.network.state_dict() for model in loaded]
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    tracked = load_model(run, "diffusion", weights="phema_0.05").network.state_dict()
    assert not all(torch.equal(states[0][k], tracked[k]) for k in tracked)
    sample = ["sample", "--num_samples", "2", "--sampler", "ddim", "--steps", "2"]
    for index, model in enumerate(
        [[str(run), "--weights", "phema_0.07"], [str(out / "phema_0.07.safetensors")]]
    ):
        samples = tmp_path / f"samples{index}.npz"
        assert main([*sample, "--model", *model, "--out", str(samples)]) == 0
        assert np.load(samples)["arr_0"].shape == (2, 8, 8, 3)

    # Fine-tuning starts from the file (a learning rate of 1e-30 leaves the weights in place).
    tuned = tmp_path / "tuned"
    init = ["--steps", "1", "--batch_size", "4", "--lr", "1e-30"]
    init += ["--init_from", str(out / "phema_0.07.safetensors")]
    assert main(["train", "--data", "digits", "--out", str(tuned), *TINY, *QUIET, *init]) == 0
    started = ckpt.read_weights(ckpt.latest_checkpoint(tuned), "model")
    for key, value in states[0].items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=1e-6)

    # Trained on, the run's newest checkpoint lacks the profile: the error names the one to use.
    assert main([*train_args, *tracking, "--steps", "8"]) == 0
    capsys.readouterr()
    code = main(
        [
            *sample,
            "--model",
            str(run),
            "--weights",
            "phema_0.07",
            "--out",
            str(tmp_path / "late.npz"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"step_000006 has: pass --model {folder} --weights phema_0.07" in err[0]


def test_phema_is_math_that_imports_no_other_admkit_module():
    tree = ast.parse(Path(phema.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [name for name in imported if name and name.startswith("admkit")]
