"""``admkit sample`` and ``admkit upsample`` end to end on tiny random models: a released-format
``.pt`` with model options, run directories (config.json + checkpoint), a classifier, classifier-
free guidance, a cascade, a preset, and the one-line errors for bad input."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from admkit import presets
from admkit.checkpoint import save_checkpoint
from admkit.cli import main
from admkit.cli.models import build_network
from admkit.compat import script_util
from admkit.data import open_dataset
from admkit.partial_samples import PartialSamples

MODEL = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_head_channels=16,
    class_cond=True,
    learn_sigma=True,
    diffusion_steps=40,
    noise_schedule="cosine",
)
CLASSIFIER = dict(
    image_size=8,
    classifier_width=32,
    classifier_depth=1,
    classifier_attention_resolutions="4",
    diffusion_steps=40,
)
UPSAMPLER = dict(
    large_size=16,
    small_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="",
    class_cond=True,
    learn_sigma=True,
    diffusion_steps=40,
)
UPSAMPLER_PRESET = {k: v for k, v in UPSAMPLER.items() if k != "channel_mult"}
K = 5


def as_options(flags: dict) -> list[str]:
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def randomised(kind: str, flags: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    network = build_network(kind, flags)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.03)
    return network


def full_flags(kind: str, flags: dict, num_classes: int) -> dict:
    defaults = {
        "diffusion": script_util.model_and_diffusion_defaults,
        "classifier": script_util.classifier_and_diffusion_defaults,
        "upsampler": script_util.sr_model_and_diffusion_defaults,
    }[kind]()
    return {**defaults, **flags, "num_classes": num_classes}


def run_dir(root, name, kind, flags, *, num_classes=K, cfg=False, seed=0):
    """A run directory as the training commands write it: config.json and one checkpoint."""
    rows = num_classes + 1 if cfg else num_classes
    flags = full_flags(kind, flags, rows)
    path = root / name
    path.mkdir()
    config = {
        "kind": kind,
        "flags": flags,
        "num_classes": num_classes if kind == "classifier" or flags.get("class_cond") else None,
        "cfg_null_label": num_classes if cfg else None,
    }
    (path / "config.json").write_text(json.dumps(config))
    model = randomised(kind, flags, seed).state_dict()
    ema = randomised(kind, flags, seed + 100).state_dict()
    save_checkpoint(path, 10, {"model": model, "ema_0.999": ema}, {"step": 10})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    released = root / "tiny_diffusion.pt"
    torch.save(randomised("diffusion", full_flags("diffusion", MODEL, K), 1).state_dict(), released)
    classifier = root / "tiny_classifier.pt"
    classifier_flags = full_flags("classifier", CLASSIFIER, K)
    torch.save(randomised("classifier", classifier_flags, 2).state_dict(), classifier)
    yield {
        "root": root,
        "released": released,
        "classifier": classifier,
        "cfg_run": run_dir(root, "cfg_run", "diffusion", MODEL, cfg=True, seed=3),
        "classifier_run": run_dir(root, "classifier_run", "classifier", CLASSIFIER, seed=4),
        "upsampler_run": run_dir(root, "upsampler_run", "upsampler", UPSAMPLER, seed=5),
    }
    torch.set_num_threads(threads)


def admkit(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load(path):
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


RELEASED_OPTIONS = as_options({**MODEL, "num_classes": K, **CLASSIFIER})


def test_help_lists_every_sampler(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in (
        "ddpm",
        "ddim",
        "dpm++2m",
        "dpm++2m-sde",
        "heun",
        "--cfg_scale",
        "--upsampler",
        "--steps",
    ):
        assert name in out


@pytest.mark.parametrize(
    "sampler, extra, evals",
    [
        ("ddpm", ["--timestep_respacing", "ddim4"], 4),
        ("ddim", ["--steps", "4", "--eta", "0.5"], 4),
        ("dpm++2m", ["--steps", "5", "--step_spacing", "logsnr"], 5),
        ("dpm++2m-sde", ["--steps", "4", "--step_spacing", "logsnr"], 4),
        ("heun", ["--steps", "6", "--step-spacing", "karras", "--s_churn", "2"], 5),
    ],
)
def test_released_checkpoint_with_every_sampler(files, tmp_path, capsys, sampler, extra, evals):
    out, grid = tmp_path / "s.npz", tmp_path / "grid.png"
    code, stdout, _ = admkit(
        capsys,
        "sample",
        "--model",
        files["released"],
        "--out",
        out,
        "--num_samples",
        5,
        "--batch_size",
        2,
        "--sampler",
        sampler,
        "--grid",
        grid,
        "--seed",
        7,
        *extra,
        *RELEASED_OPTIONS,
    )
    assert code == 0 and f"{evals} network evaluations" in stdout
    arrays = load(out)
    assert arrays["arr_0"].shape == (5, 8, 8, 3) and arrays["arr_0"].dtype == np.uint8
    assert arrays["arr_1"].dtype == np.int64 and set(arrays["arr_1"]) <= set(range(K))
    assert grid.stat().st_size > 0


def test_guided_diffusions_sampling_flags_work_as_they_are(files, tmp_path, capsys):
    # classifier_sample.py $MODEL_FLAGS $CLASSIFIER_FLAGS --classifier_path C --model_path M
    # $SAMPLE_FLAGS, with its README's 25-step DDIM flags (here 4 steps).
    size = ["--batch_size", 2, "--num_samples", 2, "--classifier_scale", "1.0"]
    paths = ["--model_path", files["released"], "--classifier_path", files["classifier"]]
    names = ["--model", files["released"], "--classifier", files["classifier"]]

    def images(name, *argv):
        code, _, err = admkit(
            capsys, "sample", *RELEASED_OPTIONS, *size, *argv, "--out", tmp_path / name
        )
        assert code == 0, err
        return load(tmp_path / name)["arr_0"]

    original = images("original.npz", *paths, "--timestep_respacing", "ddim4", "--use_ddim", "True")
    ours = images("ours.npz", *names, "--timestep_respacing", "ddim4", "--sampler", "ddim")
    np.testing.assert_array_equal(original, ours)
    # The same steps sampled ancestrally: what --use_ddim False (and no flag) gives.
    ancestral = images("ancestral.npz", *paths, "--timestep_respacing", "ddim4", "--use_ddim", "0")
    np.testing.assert_array_equal(
        ancestral, images("ddpm.npz", *names, "--timestep_respacing", "ddim4")
    )
    assert not np.array_equal(ancestral, original)
    message = _error(
        capsys,
        "sample",
        *RELEASED_OPTIONS,
        *names,
        "--use_ddim",
        "True",
        "--sampler",
        "heun",
        "--out",
        tmp_path / "x.npz",
    )
    assert "--use_ddim True means --sampler ddim, not heun" in message


def test_dpm_solver_eta_one_is_the_sde_sampler(files, tmp_path, capsys):
    common = ["sample", "--model", files["released"], *RELEASED_OPTIONS, "--num_samples", 3]
    common += ["--steps", 4, "--seed", 5]
    runs = {
        "sde": ["--sampler", "dpm++2m-sde"],
        "eta1": ["--sampler", "dpm++2m", "--eta", 1],
        "ode": ["--sampler", "dpm++2m"],
    }
    for name, extra in runs.items():
        code, _, err = admkit(capsys, *common, *extra, "--out", tmp_path / f"{name}.npz")
        assert code == 0, err
    images = {name: load(tmp_path / f"{name}.npz")["arr_0"] for name in runs}
    np.testing.assert_array_equal(images["eta1"], images["sde"])
    assert (images["ode"] != images["sde"]).any()


def test_compile_gives_the_eager_images_and_falls_back_where_it_fails(
    files, tmp_path, capsys, monkeypatch
):
    common = ["sample", "--model", files["released"], *RELEASED_OPTIONS, "--num_samples", 3]
    common += ["--steps", 3, "--seed", 2, "--sampler", "ddim", "--batch_size", 3]
    code, _, err = admkit(capsys, *common, "--out", tmp_path / "eager.npz")
    assert code == 0, err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = admkit(capsys, *common, "--compile", "--out", tmp_path / "compiled.npz")
    assert code == 0, err
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]  # it did compile
    eager = load(tmp_path / "eager.npz")["arr_0"].astype(int)
    compiled = load(tmp_path / "compiled.npz")["arr_0"].astype(int)
    # Equal to rounding: a value near a quantisation boundary may land one level off.
    assert np.abs(compiled - eager).max() <= 1 and (compiled == eager).mean() > 0.99

    def broken(*args, **kwargs):
        def fail(*args, **kwargs):
            raise RuntimeError("no working C++ compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile failed .no working C.. compiler"):
        code, _, err = admkit(capsys, *common, "--compile", "--out", tmp_path / "fallback.npz")
    assert code == 0, err
    np.testing.assert_array_equal(load(tmp_path / "fallback.npz")["arr_0"], eager)


def test_run_directory_with_cfg_labels_weights_and_precision(files, tmp_path, capsys):
    common = [
        "sample",
        "--model",
        files["cfg_run"],
        "--num_samples",
        4,
        "--steps",
        3,
        "--sampler",
        "ddim",
        "--class_label",
        3,
        "--class-label",
        1,
    ]
    code, _, _ = admkit(
        capsys,
        *common,
        "--out",
        tmp_path / "a.npz",
        "--cfg_scale",
        2.5,
        "--guidance_interval",
        "5,30",
        "--dynamic_threshold",
        0.99,
    )
    assert code == 0
    a = load(tmp_path / "a.npz")
    assert a["arr_1"].tolist() == [3, 1, 3, 1]
    # CFG at scale 1 is the conditional model; the raw weights differ from the EMA's.
    admkit(capsys, *common, "--out", tmp_path / "one.npz", "--cfg_scale", 1)
    admkit(capsys, *common, "--out", tmp_path / "plain.npz")
    admkit(capsys, *common, "--out", tmp_path / "raw.npz", "--weights", "model")
    admkit(capsys, *common, "--out", tmp_path / "bf16.npz", "--precision", "bf16")
    one, plain = load(tmp_path / "one.npz")["arr_0"], load(tmp_path / "plain.npz")["arr_0"]
    assert np.abs(one.astype(int) - plain).max() <= 1
    # (Untrained networks saturate most pixels, so "different" means "not identical" here.)
    assert not np.array_equal(a["arr_0"], plain)
    assert not np.array_equal(load(tmp_path / "raw.npz")["arr_0"], plain)
    admkit(capsys, *common, "--out", tmp_path / "ema.npz", "--weights", "ema_0.999")
    np.testing.assert_array_equal(load(tmp_path / "ema.npz")["arr_0"], plain)
    assert load(tmp_path / "bf16.npz")["arr_0"].shape == (4, 8, 8, 3)


def test_a_checkpoint_folder_or_a_file_in_one_samples_that_checkpoint(files, tmp_path, capsys):
    run = run_dir(tmp_path, "two_checkpoints", "diffusion", MODEL, seed=7)
    flags = full_flags("diffusion", MODEL, K)
    later = {
        "model": randomised("diffusion", flags, 8),
        "ema_0.999": randomised("diffusion", flags, 9),
    }
    save_checkpoint(run, 20, {k: v.state_dict() for k, v in later.items()}, {"step": 20})
    first, second = run / "checkpoints" / "step_000010", run / "checkpoints" / "step_000020"
    common = ["--num_samples", 2, "--steps", 3, "--sampler", "ddim", "--class_label", 2]

    def images(name, model, *extra):
        code, _, err = admkit(
            capsys, "sample", "--model", model, *common, *extra, "--out", tmp_path / name
        )
        assert code == 0, err
        return load(tmp_path / name)["arr_0"]

    newest = images("run.npz", run)
    np.testing.assert_array_equal(images("second.npz", second), newest)
    older = images("first.npz", first)
    assert not np.array_equal(older, newest)
    np.testing.assert_array_equal(images("first_ema.npz", first / "ema_0.999.safetensors"), older)
    raw = images("first_raw.npz", first, "--weights", "model")
    np.testing.assert_array_equal(images("first_raw_file.npz", first / "model.safetensors"), raw)
    assert not np.array_equal(raw, older)

    out = ["--out", tmp_path / "x.npz"]
    weights_file = ["sample", "--model", first / "model.safetensors", *out]
    assert "one weights file" in _error(capsys, *weights_file, "--weights", "ema_0.999")
    assert "an upsampler is needed" in _error(
        capsys, "upsample", "--model", run, "--base_samples", tmp_path / "run.npz", *out
    )
    classifier_checkpoint = files["classifier_run"] / "checkpoints" / "step_000010"
    assert "holds a classifier; a diffusion model is needed" in _error(
        capsys, "sample", "--model", classifier_checkpoint, *out
    )
    (first / "manifest.json").unlink()
    assert "not a complete admkit checkpoint" in _error(capsys, "sample", "--model", first, *out)
    assert not (tmp_path / "x.npz").exists()


NAMES = ["ant", "bee", "cat", "dog", "eel"]


def named_run(root):
    """A run whose config.json records its training data's class names, as training does."""
    run = run_dir(root, "named", "diffusion", MODEL, seed=11)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "class_names": NAMES}))
    return run


def test_class_labels_by_name(files, tmp_path, capsys):
    run = named_run(tmp_path)
    common = ["sample", "--model", run, "--num_samples", 3, "--steps", 2]
    by_number = [*common, "--class_label", 3, "--class_label", 0, "--out", tmp_path / "n.npz"]
    by_name = [*common, "--class_label", "dog", "--class_label", "ant", "--out", tmp_path / "a.npz"]
    for argv in (by_number, by_name):
        code, _, err = admkit(capsys, *argv)
        assert code == 0, err
    numbered, named = load(tmp_path / "n.npz"), load(tmp_path / "a.npz")
    assert named["arr_1"].tolist() == [3, 0, 3]
    np.testing.assert_array_equal(named["arr_0"], numbered["arr_0"])
    out = ["--out", tmp_path / "x.npz"]
    assert "this model's classes are: ant, bee" in _error(
        capsys, *common, "--class_label", "cow", *out
    )
    released = ["sample", "--model", files["released"], *RELEASED_OPTIONS, "--steps", 2]
    assert "no class names" in _error(capsys, *released, "--class_label", "dog", *out)


def test_png_dir_writes_every_image_named_by_class_so_that_it_reads_back_as_data(
    files, tmp_path, capsys
):
    run, names = named_run(tmp_path), NAMES
    folder = tmp_path / "pngs"
    argv = ["sample", "--model", run, "--num_samples", 5, "--steps", 2, "--png_dir", folder]
    argv += ["--class_label", 3, "--class_label", 0]
    code, _, err = admkit(capsys, *argv, "--out", tmp_path / "s.npz")
    assert code == 0, err
    samples = load(tmp_path / "s.npz")
    assert sorted(p.name for p in folder.iterdir()) == [
        *("ant_000001.png", "ant_000003.png"),
        *("dog_000000.png", "dog_000002.png", "dog_000004.png"),
    ]
    for index, label in enumerate(samples["arr_1"]):
        image = np.asarray(Image.open(folder / f"{names[label]}_{index:06d}.png"))
        np.testing.assert_array_equal(image, samples["arr_0"][index])
    data = open_dataset(folder, 8)
    assert data.class_names == ["ant", "dog"] and sorted(data.labels) == [0, 0, 1, 1, 1]

    # An existing folder is kept unless --overwrite (checked before sampling); then replaced.
    again = [*argv, "--seed", 1, "--out", tmp_path / "t.npz"]
    assert "--overwrite" in _error(capsys, *again)
    assert not (tmp_path / "t.npz").exists()
    code, _, err = admkit(capsys, *again, "--overwrite")
    assert code == 0, err
    replaced = np.asarray(Image.open(folder / "dog_000000.png"))
    np.testing.assert_array_equal(replaced, load(tmp_path / "t.npz")["arr_0"][0])
    assert not np.array_equal(replaced, samples["arr_0"][0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # Unlabelled images are numbered only.
    unconditional = run_dir(tmp_path, "uncond", "diffusion", {**MODEL, "class_cond": False})
    plain = tmp_path / "plain"
    code, _, err = admkit(
        capsys, "sample", "--model", unconditional, "--num_samples", 2, "--steps", 2,
        "--out", tmp_path / "u.npz", "--png_dir", plain,
    )  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in plain.iterdir()) == ["000000.png", "000001.png"]


def test_an_interrupted_job_continues_where_it_stopped(files, tmp_path, capsys, monkeypatch):
    common = ["sample", "--model", files["cfg_run"], "--num_samples", 5, "--steps", 2]
    common += ["--sampler", "ddim", "--cfg_scale", 2]
    whole, cut = tmp_path / "whole.npz", tmp_path / "cut.npz"
    code, _, err = admkit(capsys, *common, "--batch_size", 2, "--out", whole)
    assert code == 0, err
    # Ctrl-C after the second batch of two: four images are kept, no output is written.
    added, keep = [], PartialSamples.add

    def add_then_interrupt(self, indices, images, evals):
        keep(self, indices, images, evals)
        added.append(indices.tolist())
        if len(added) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialSamples, "add", add_then_interrupt)
    code, _, err = admkit(capsys, *common, "--batch_size", 2, "--out", cut)
    assert code == 130 and "4 images are kept" in err and "rerun the same command" in err, err
    assert not cut.exists() and added == [[0, 1], [2, 3]]
    # Another job cannot take over the kept images; the same job continues, at any batch size,
    # drawing only the missing image, and ends as the uninterrupted run did.
    assert "other options" in _error(capsys, *common, "--seed", 1, "--out", cut)
    added.clear()
    code, _, err = admkit(capsys, *common, "--batch_size", 3, "--out", cut)
    assert code == 0 and "4 images kept" in err, err
    assert added == [[4]]
    for name in ("arr_0", "arr_1"):
        np.testing.assert_array_equal(load(cut)[name], load(whole)[name])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_classifier_guidance_from_a_file_and_a_run_directory(files, tmp_path, capsys):
    released = [
        "sample",
        "--model",
        files["released"],
        "--num_samples",
        3,
        "--steps",
        3,
        *RELEASED_OPTIONS,
    ]
    for name, classifier, extra in (
        ("file", files["classifier"], ["--sampler", "ddpm"]),
        ("run", files["classifier_run"], ["--sampler", "dpm++2m", "--guidance_interval", "0,20"]),
    ):
        code, _, err = admkit(
            capsys,
            *released,
            "--out",
            tmp_path / f"{name}.npz",
            "--classifier",
            classifier,
            "--classifier_scale",
            30,
            *extra,
        )
        assert code == 0, err
    admkit(capsys, *released, "--out", tmp_path / "plain.npz")
    guided, plain = load(tmp_path / "file.npz"), load(tmp_path / "plain.npz")
    np.testing.assert_array_equal(guided["arr_1"], plain["arr_1"])
    assert not np.array_equal(guided["arr_0"], plain["arr_0"])
    # Both at once: classifier-free guidance and a classifier.
    code, _, err = admkit(
        capsys,
        "sample",
        "--model",
        files["cfg_run"],
        "--steps",
        3,
        "--num_samples",
        2,
        "--out",
        tmp_path / "both.npz",
        "--cfg_scale",
        2,
        "--classifier",
        files["classifier_run"],
        "--sampler",
        "heun",
    )
    assert code == 0, err


def test_cascade_equals_sampling_then_upsampling(files, tmp_path, capsys):
    base = [
        "--model",
        files["released"],
        "--num_samples",
        3,
        "--steps",
        3,
        "--seed",
        11,
        *RELEASED_OPTIONS,
    ]
    code, stdout, err = admkit(
        capsys,
        "sample",
        *base,
        "--out",
        tmp_path / "cascade.npz",
        "--upsampler",
        files["upsampler_run"],
        "--upsampler_steps",
        2,
        "--batch_size",
        2,
    )
    assert code == 0, err
    assert "3 + 2 network evaluations" in stdout
    admkit(capsys, "sample", *base, "--out", tmp_path / "base.npz")
    code, _, err = admkit(
        capsys,
        "upsample",
        "--model",
        files["upsampler_run"],
        "--base_samples",
        tmp_path / "base.npz",
        "--out",
        tmp_path / "up.npz",
        "--steps",
        2,
        "--seed",
        11,
        "--grid",
        tmp_path / "up.png",
    )
    assert code == 0, err
    cascade, up = load(tmp_path / "cascade.npz"), load(tmp_path / "up.npz")
    assert cascade["arr_0"].shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(cascade["arr_0"], up["arr_0"])
    np.testing.assert_array_equal(up["arr_1"], load(tmp_path / "base.npz")["arr_1"])


def test_bare_upsampler_file_takes_its_channel_mult(tmp_path, capsys):
    # A 16px upsampler trained with channel_mult 1,2 (the table's 16px default is 1,2,2).
    flags = full_flags("upsampler", UPSAMPLER, 5)
    torch.save(randomised("upsampler", flags, 9).state_dict(), tmp_path / "u.pt")
    base = tmp_path / "base.npz"
    np.savez(base, np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 4]))
    options = as_options({**UPSAMPLER_PRESET, "num_classes": K})
    argv = ["upsample", "--model", tmp_path / "u.pt", "--base_samples", base, "--steps", 2]
    code, _, err = admkit(capsys, *argv, *options, "--out", tmp_path / "without.npz")
    assert code == 2 and "shape" in err  # the default multipliers do not fit
    code, _, err = admkit(
        capsys, *argv, *options, "--channel_mult", "1,2", "--out", tmp_path / "with.npz"
    )
    assert code == 0, err
    assert load(tmp_path / "with.npz")["arr_0"].shape == (2, 16, 16, 3)


@pytest.fixture
def tiny_presets(monkeypatch):
    """Two tiny entries in the preset table, as a released model and its classifier."""
    monkeypatch.setitem(
        presets._TABLE,
        "tiny-test",
        (
            "diffusion",
            "tiny",
            "tiny.pt",
            MODEL,
            dict(timestep_respacing="4", classifier="tiny-classifier", classifier_scale=8.0),
        ),
    )
    monkeypatch.setitem(
        presets._TABLE,
        "tiny-classifier",
        ("classifier", "tiny classifier", "tiny_c.pt", CLASSIFIER, {}),
    )
    monkeypatch.setitem(
        presets._TABLE,
        "tiny-upsampler",
        ("upsampler", "tiny upsampler", "tiny_u.pt", UPSAMPLER_PRESET, {"timestep_respacing": "3"}),
    )
    presets.get_preset.cache_clear()
    yield
    presets.get_preset.cache_clear()


def test_a_preset_brings_its_classifier_scale_and_respacing(tiny_presets, tmp_path, capsys):
    flags = full_flags("diffusion", MODEL, 1000)
    torch.save(randomised("diffusion", flags, 6).state_dict(), tmp_path / "m.pt")
    classifier_flags = full_flags("classifier", CLASSIFIER, 1000)
    torch.save(randomised("classifier", classifier_flags, 7).state_dict(), tmp_path / "c.pt")
    common = ["sample", "--model", tmp_path / "m.pt", "--preset", "tiny-test", "--num_samples", 2]
    code, stdout, err = admkit(
        capsys, *common, "--classifier", tmp_path / "c.pt", "--out", tmp_path / "preset.npz"
    )
    assert code == 0, err
    assert "4 network evaluations" in stdout  # the preset's respacing
    admkit(
        capsys,
        *common,
        "--classifier",
        tmp_path / "c.pt",
        "--classifier_scale",
        8,
        "--out",
        tmp_path / "explicit.npz",
    )
    np.testing.assert_array_equal(
        load(tmp_path / "preset.npz")["arr_0"], load(tmp_path / "explicit.npz")["arr_0"]
    )
    assert load(tmp_path / "preset.npz")["arr_1"].max() < 1000
    # A bare upsampler checkpoint with its preset, and the remaining options.
    up_flags = full_flags("upsampler", UPSAMPLER_PRESET, 1000)
    torch.save(randomised("upsampler", up_flags, 8).state_dict(), tmp_path / "u.pt")
    code, stdout, err = admkit(
        capsys,
        *common,
        "--classifier",
        tmp_path / "c.pt",
        "--classifier_preset",
        "tiny-classifier",
        "--upsampler",
        tmp_path / "u.pt",
        "--upsampler_preset",
        "tiny-upsampler",
        "--upsampler_sampler",
        "ddim",
        "--clip_denoised",
        "False",
        "--device",
        "cpu",
        "--overwrite",
        "--out",
        tmp_path / "preset.npz",
    )
    assert code == 0, err
    assert "ddpm then ddim; 4 + 3 network evaluations" in stdout  # both presets' respacings
    assert load(tmp_path / "preset.npz")["arr_0"].shape == (2, 16, 16, 3)


def _error(capsys, *argv) -> str:
    code, _, err = admkit(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input_gives_one_line_errors(files, tmp_path, capsys):
    released = ["sample", "--model", files["released"], *RELEASED_OPTIONS, "--steps", 2]
    out = ["--out", tmp_path / "x.npz"]
    assert "unknown sampler 'euler'" in _error(capsys, *released, *out, "--sampler", "euler")
    assert "needs a classifier" in _error(capsys, *released, *out, "--classifier_scale", 2)
    assert "out of range" in _error(capsys, *released, *out, "--class_label", K)
    assert "label dropout" in _error(capsys, *released, *out, "--cfg_scale", 2)
    assert "--eta applies to ddim and dpm++2m" in _error(
        capsys, *released, *out, "--sampler", "heun", "--eta", 1
    )
    assert "0 or more" in _error(capsys, *released, *out, "--sampler", "ddim", "--eta", -1)
    assert "not both" in _error(capsys, *released, *out, "--timestep_respacing", "4")
    assert "does not exist" in _error(capsys, "sample", "--model", tmp_path / "nope.pt", *out)
    garbled = tmp_path / "garbled.pt"
    garbled.write_bytes(b"not a checkpoint at all")
    assert "garbled.pt" in _error(capsys, "sample", "--model", garbled, *out, *RELEASED_OPTIONS)
    wrong = ["--num_channels", "64"]
    assert "does not match" in _error(capsys, *released, *out, *wrong)
    bare = ["--upsampler", files["released"]]
    assert "--upsampler_preset" in _error(capsys, *released, *out, *bare)
    unconditional = run_dir(tmp_path, "uncond", "diffusion", {**MODEL, "class_cond": False})
    assert "unconditional" in _error(
        capsys, "sample", "--model", unconditional, *out, "--class_label", 1
    )
    (tmp_path / "exists.npz").write_bytes(b"")
    assert "--overwrite" in _error(capsys, *released, "--out", tmp_path / "exists.npz")
    # upsample: base samples that are not what it needs
    up = ["upsample", "--model", files["upsampler_run"], *out]
    floats = tmp_path / "floats.npz"
    np.savez(floats, np.zeros((2, 8, 8, 3), np.float32))
    assert "uint8" in _error(capsys, *up, "--base_samples", floats)
    small = tmp_path / "small.npz"
    np.savez(small, np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]))
    assert "takes 8x8" in _error(capsys, *up, "--base_samples", small)
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, np.zeros((2, 8, 8, 3), np.uint8))
    assert "no arr_1" in _error(capsys, *up, "--base_samples", unlabelled)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes((tmp_path / "small.npz").read_bytes()[:100])
    assert "truncated" in _error(capsys, *up, "--base_samples", truncated)
    assert not (tmp_path / "x.npz").exists()
