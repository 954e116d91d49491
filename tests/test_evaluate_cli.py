"""``admkit evaluate`` and ``admkit ref-batch`` end to end, on tiny npz files and random weights.

The numbers are checked against what the definitions give when computed here, directly from
one forward of the network over all images (no streaming, no batching, plain numpy).
"""

import json

import numpy as np
import pytest
import scipy.special
import torch
from PIL import Image

from admkit.cli import main
from admkit.metrics.evaluate import NpzImages
from admkit.metrics.inception import random_inception

NUM_IMAGES = 5

# Five images give rank-4 covariances; scipy warns that their product is singular, as expected.
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")


@pytest.fixture(scope="module")
def model():
    return random_inception(seed=0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # Different brightness per image, so the features differ clearly between images.
    base = rng.integers(0, 100, size=(NUM_IMAGES, 24, 24, 3))
    return (base + np.arange(NUM_IMAGES)[:, None, None, None] * 30).astype(np.uint8)


@pytest.fixture(scope="module")
def direct(model, images):
    """pool_3, sFID features and class probabilities from one forward over all images."""
    with torch.inference_mode():
        out = model(torch.from_numpy(images))
    pool_3 = out.pool_3.double().numpy()
    nhwc = out.mixed_6_conv.permute(0, 2, 3, 1).double().numpy()
    spatial = nhwc[..., :7].reshape(NUM_IMAGES, -1)
    probs = scipy.special.softmax(pool_3 @ model.fc.weight.double().numpy().T, axis=1)
    return {"pool_3": pool_3, "spatial": spatial, "probs": probs}


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_identical_batches(tmp_path, capsys, weights, images, direct):
    np.savez(tmp_path / "ref.npz", images)
    np.savez(tmp_path / "samples.npz", images, np.arange(NUM_IMAGES))  # labels in arr_1 too
    out_json = tmp_path / "metrics.json"
    code, out, err = run(
        capsys,
        "evaluate",
        tmp_path / "ref.npz",
        tmp_path / "samples.npz",
        "--inception_weights",
        weights,
        "--batch-size",
        2,  # 5 images: batches of 2, 2 and 1
        "--device",
        "cpu",
        "--json",
        out_json,
    )
    assert code == 0, err
    for name in ["Inception Score", "FID", "sFID", "Precision", "Recall"]:
        assert name in out
    result = json.loads(out_json.read_text())
    p = direct["probs"]
    expected_is = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
    assert result["inception_score"] == pytest.approx(expected_is, rel=1e-4)
    assert result["fid"] == pytest.approx(0, abs=1e-3)
    assert result["sfid"] == pytest.approx(0, abs=1e-3)
    assert result["precision"] == 1.0 and result["recall"] == 1.0
    assert result["reference_statistics"] == "arr_0"
    assert result["num_reference"] == result["num_samples"] == NUM_IMAGES


def test_ref_batch_stores_statistics_that_evaluate_then_uses(
    tmp_path, capsys, weights, images, direct
):
    np.savez(tmp_path / "data.npz", images)
    code, out, err = run(
        capsys,
        "ref-batch",
        tmp_path / "data.npz",
        "--out",
        tmp_path / "ref.npz",
        "--with_stats",
        "--inception-weights",
        weights,
        "--device",
        "cpu",
    )
    assert code == 0, err
    with np.load(tmp_path / "ref.npz") as ref:
        stored = {key: ref[key] for key in ref.files}
    assert set(stored) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s"}
    assert np.array_equal(stored["arr_0"], images)
    np.testing.assert_allclose(stored["mu"], direct["pool_3"].mean(0), atol=1e-5)
    np.testing.assert_allclose(stored["sigma"], np.cov(direct["pool_3"], rowvar=False), atol=1e-5)
    np.testing.assert_allclose(stored["mu_s"], direct["spatial"].mean(0), atol=1e-5)
    np.testing.assert_allclose(
        stored["sigma_s"], np.cov(direct["spatial"], rowvar=False), atol=1e-5
    )

    # Replace the stored statistics by N(μ + δ, 0): then d² = ‖δ‖² + tr Σ_samples exactly, which
    # only comes out if evaluate reads mu, sigma, mu_s, sigma_s instead of using arr_0.
    shifted = {
        "arr_0": images,
        "mu": stored["mu"] + 0.05,
        "sigma": np.zeros_like(stored["sigma"]),
        "mu_s": stored["mu_s"] - 0.05,
        "sigma_s": np.zeros_like(stored["sigma_s"]),
    }
    np.savez(tmp_path / "shifted.npz", **shifted)
    np.savez(tmp_path / "samples.npz", images)
    code, out, err = run(
        capsys,
        "evaluate",
        tmp_path / "shifted.npz",
        tmp_path / "samples.npz",
        "--inception_weights",
        weights,
        "--device",
        "cpu",
        "--json",
        tmp_path / "metrics.json",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["reference_statistics"] == "precomputed"
    trace = np.trace(np.cov(direct["pool_3"], rowvar=False))
    trace_s = np.trace(np.cov(direct["spatial"], rowvar=False))
    assert result["fid"] == pytest.approx(2048 * 0.05**2 + trace, rel=1e-5)
    assert result["sfid"] == pytest.approx(2023 * 0.05**2 + trace_s, rel=1e-5)
    assert result["precision"] == 1.0 and result["recall"] == 1.0  # arr_0 still used for P/R


def test_ref_batch_from_an_image_folder(tmp_path, capsys):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # H 20, W 40
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    (folder / "b" / "c").mkdir(parents=True)
    Image.fromarray(wide).save(folder / "a" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
        folder / "b" / "c" / "x.JPG"
    )
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / "gray.webp")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    code, out, err = run(
        capsys, "ref-batch", folder, "--out", tmp_path / "ref.npz", "--image_size", 10
    )
    assert code == 0, err
    assert "broken.png" in err  # skipped with a warning naming the file
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref.files == ["arr_0"]
        arr = ref["arr_0"]
    assert arr.shape == (3, 10, 10, 3) and arr.dtype == np.uint8
    # Order: sorted entries, depth first (a/, b/, then gray.webp). The 40×20 image has short
    # side 20 ≥ 2·10, so it is box-halved to 20×10 (2×2 means) and centre-cropped at x = 5.
    halved = wide.astype(np.float64).reshape(10, 2, 20, 2, 3).mean(axis=(1, 3))
    assert np.abs(arr[0].astype(np.float64) - halved[:, 5:15]).max() <= 1


def one_line_error(code, err, command):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"admkit {command}: error:"), err
    return lines[0]


@pytest.mark.parametrize(
    "problem, message",
    [
        ("truncated", "not a readable .npz"),
        ("not_a_zip", "not a readable .npz"),
        ("no_arr_0", "no arr_0"),
        ("float_images", "dtype float32"),
        ("grayscale", "shape (5, 24, 24)"),
        ("too_few", "at least 4"),
        ("missing_file", "no such file"),
    ],
)
def test_bad_sample_batches_give_one_line_errors(
    tmp_path, capsys, weights, images, problem, message
):
    np.savez(tmp_path / "ref.npz", images)
    bad = tmp_path / "samples.npz"
    if problem == "truncated":
        np.savez(bad, images)
        bad.write_bytes(bad.read_bytes()[:-300])
    elif problem == "not_a_zip":
        bad.write_text("hello")
    elif problem == "no_arr_0":
        np.savez(bad, images=images)
    elif problem == "float_images":
        np.savez(bad, images.astype(np.float32))
    elif problem == "grayscale":
        np.savez(bad, images[..., 0])
    elif problem == "too_few":
        np.savez(bad, images[:3])
    code, _, err = run(
        capsys, "evaluate", tmp_path / "ref.npz", bad, "--inception_weights", weights
    )
    assert message in one_line_error(code, err, "evaluate")


def test_missing_or_wrong_weights_give_one_line_errors(tmp_path, capsys, images, monkeypatch):
    monkeypatch.delenv("ADMKIT_INCEPTION", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    np.savez(tmp_path / "ref.npz", images)
    code, _, err = run(capsys, "evaluate", tmp_path / "ref.npz", tmp_path / "ref.npz")
    assert "pt_inception-2015-12-05-6726825d.pth" in one_line_error(code, err, "evaluate")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    code, _, err = run(
        capsys,
        "evaluate",
        tmp_path / "ref.npz",
        tmp_path / "ref.npz",
        "--inception_weights",
        tmp_path / "other.pth",
    )
    assert "not an FID Inception weights file" in one_line_error(code, err, "evaluate")


def test_existing_outputs_are_not_overwritten(tmp_path, capsys, images):
    np.savez(tmp_path / "ref.npz", images)
    (tmp_path / "metrics.json").write_text("{}")
    code, _, err = run(
        capsys,
        "evaluate",
        tmp_path / "ref.npz",
        tmp_path / "ref.npz",
        "--json",
        tmp_path / "metrics.json",
    )
    assert "--overwrite" in one_line_error(code, err, "evaluate")
    code, _, err = run(capsys, "ref-batch", tmp_path / "ref.npz", "--out", tmp_path / "ref.npz")
    assert "--overwrite" in one_line_error(code, err, "ref-batch")


def test_ref_batch_folder_problems(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "ref-batch", tmp_path / "empty", "--out", tmp_path / "r.npz")
    assert "--image_size" in one_line_error(code, err, "ref-batch")
    code, _, err = run(
        capsys, "ref-batch", tmp_path / "empty", "--out", tmp_path / "r.npz", "--image_size", 8
    )
    assert "no jpg" in one_line_error(code, err, "ref-batch")
    assert not (tmp_path / "r.npz").exists()


@pytest.mark.parametrize("layout", ["plain", "compressed", "fortran"])
def test_batches_stream_back_the_stored_images(tmp_path, images, layout):
    path = tmp_path / "batch.npz"
    if layout == "compressed":
        np.savez_compressed(path, images)
    else:
        np.savez(path, np.asfortranarray(images) if layout == "fortran" else images)
    batch = NpzImages(path)
    assert len(batch) == NUM_IMAGES
    chunks = list(batch.batches(1, NUM_IMAGES, 3))
    assert [len(chunk) for chunk in chunks] == [3, 1]
    assert np.array_equal(np.concatenate(chunks), images[1:])
