"""``admkit sample --guide_model G --guide_scale W``: guidance by a second network (autoguidance,
or classifier-free guidance with a separate unconditional network) end to end on tiny random
models, with its identities, its compositions and its one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_sample_cli import CLASSIFIER, MODEL, admkit, load, run_dir

SMALL_GUIDE = {**MODEL, "channel_mult": "1,1", "attention_resolutions": "", "class_cond": False}
SMALL_GUIDE["learn_sigma"] = False
SIZE = ["--num_samples", 4, "--batch_size", 4, "--seed", 3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("guide_models")
    yield {
        "model": run_dir(root, "model", "diffusion", MODEL, seed=11),
        # Smaller, unconditional, without learned variances: a guide may be any of these.
        "guide": run_dir(root, "guide", "diffusion", SMALL_GUIDE, seed=12),
        "classifier": run_dir(root, "classifier", "classifier", CLASSIFIER, seed=13),
        "big": run_dir(root, "big", "diffusion", {**MODEL, "image_size": 16}, seed=14),
        "other_schedule": run_dir(
            root, "other_schedule", "diffusion", {**MODEL, "noise_schedule": "linear"}, seed=15
        ),
        "other_steps": run_dir(
            root, "other_steps", "diffusion", {**MODEL, "diffusion_steps": 50}, seed=16
        ),
        "x0": run_dir(root, "x0", "diffusion", {**MODEL, "predict_xstart": True}, seed=17),
        "rescaled": run_dir(
            root, "rescaled", "diffusion", {**MODEL, "rescale_timesteps": True}, seed=18
        ),
    }
    torch.set_num_threads(threads)


def _sample(capsys, out, *argv) -> dict[str, np.ndarray]:
    code, _, err = admkit(capsys, "sample", *SIZE, "--out", out, *argv)
    assert code == 0, err
    return load(out)


def test_guide_scale_one_is_the_model_and_zero_the_guide(runs, tmp_path, capsys):
    # DDIM at η = 0 reads only the mean channels, where the guided model is D_0 + w (D_1 - D_0).
    ddim = ["--sampler", "ddim", "--steps", 5]
    model = _sample(capsys, tmp_path / "m.npz", "--model", runs["model"], *ddim)
    guide = ["--guide_model", runs["guide"], "--guide_weights", "model"]
    at_one = _sample(capsys, tmp_path / "w1.npz", "--model", runs["model"], *ddim, *guide,
                     "--guide_scale", 1)  # fmt: skip
    assert np.array_equal(at_one["arr_0"], model["arr_0"])
    assert np.array_equal(at_one["arr_1"], model["arr_1"])
    at_zero = _sample(capsys, tmp_path / "w0.npz", "--model", runs["model"], *ddim, *guide,
                      "--guide_scale", 0)  # fmt: skip
    alone = _sample(capsys, tmp_path / "g.npz", "--model", runs["guide"], "--weights", "model",
                    *ddim)  # fmt: skip
    assert np.array_equal(at_zero["arr_0"], alone["arr_0"])
    at_two = _sample(capsys, tmp_path / "w2.npz", "--model", runs["model"], *ddim, *guide,
                     "--guide_scale", 2)  # fmt: skip
    assert not np.array_equal(at_two["arr_0"], model["arr_0"])


@pytest.mark.parametrize("sampler", ["ddpm", "dpm++2m-sde", "heun"])
def test_guide_model_works_with_every_kind_of_sampler_interval_and_classifier(
    runs, tmp_path, capsys, sampler
):
    common = ["--model", runs["model"], "--sampler", sampler, "--steps", 5]
    guide = ["--guide_model", runs["guide"], "--guide_scale", 2.5]
    plain = _sample(capsys, tmp_path / "plain.npz", *common)
    guided = _sample(capsys, tmp_path / "guided.npz", *common, *guide)
    assert not np.array_equal(guided["arr_0"], plain["arr_0"])
    # An interval over the whole chain (40 steps) is the guided model; over part of it, neither.
    whole = _sample(capsys, tmp_path / "whole.npz", *common, *guide, "--guidance_interval", "0,39")
    assert np.array_equal(whole["arr_0"], guided["arr_0"])
    part = _sample(capsys, tmp_path / "part.npz", *common, *guide, "--guidance_interval", "20,39")
    assert not np.array_equal(part["arr_0"], guided["arr_0"])
    assert not np.array_equal(part["arr_0"], plain["arr_0"])
    # Random tiny networks saturate most pixels: a large scale is needed to move some.
    classifier = ["--classifier", runs["classifier"], "--classifier_scale", 300]
    both = _sample(capsys, tmp_path / "both.npz", *common, *guide, *classifier)
    assert not np.array_equal(both["arr_0"], guided["arr_0"])


def test_guide_mismatches_and_incomplete_options_are_one_line_errors(runs, tmp_path, capsys):
    model = ["--model", runs["model"], "--steps", 2]
    cases = [
        (["--guide_model", runs["big"], "--guide_scale", 2], "image size 16"),
        (["--guide_model", runs["other_schedule"], "--guide_scale", 2], "noise schedule"),
        (["--guide_model", runs["other_steps"], "--guide_scale", 2], "diffusion steps 50"),
        (["--guide_model", runs["x0"], "--guide_scale", 2], "predict_xstart"),
        (["--guide_model", runs["rescaled"], "--guide_scale", 2], "rescale_timesteps"),
        (["--guide_model", runs["classifier"], "--guide_scale", 2], "holds a classifier"),
        (["--guide_model", tmp_path / "nothing", "--guide_scale", 2], "does not exist"),
        (["--guide_scale", 2], "needs both --guide_model"),
        (["--guide_model", runs["guide"]], "needs both --guide_model"),
        (["--guide_weights", "model"], "add --guide_model"),
        (["--guide_model", runs["guide"], "--guide_scale", 2, "--cfg_scale", 2], "use one"),
    ]
    for argv, message in cases:
        code, _, err = admkit(capsys, "sample", *model, *argv, "--out", tmp_path / "x.npz")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (argv, err)
        assert not (tmp_path / "x.npz").exists()
    # The error names both models.
    code, _, err = admkit(capsys, "sample", *model, "--guide_model", runs["big"],
                          "--guide_scale", 2, "--out", tmp_path / "x.npz")  # fmt: skip
    assert str(runs["big"]) in err and str(runs["model"]) in err
