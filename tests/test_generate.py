"""admkit.generate: per-image seeds (batch size and process count do not matter), labels,
quantisation, cascades, precision, and the files it writes."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from admkit.compat import script_util
from admkit.diffusion import Diffusion, DiffusionConfig, respace
from admkit.errors import UserError
from admkit.generate import (
    Stage,
    check_outputs,
    dequantize,
    draw_labels,
    generate,
    image_grid,
    network_fn,
    quantize,
    save_grid,
    save_samples,
)
from admkit.step_selection import select_timesteps
from admkit.unet import SuperResUNet, UNet

TINY = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_head_channels=16,
    class_cond=True,
    learn_sigma=True,
    num_classes=5,
)
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed: int = 0, **overrides) -> UNet:
    """A small class-conditional ADM with random (not zero-initialised) weights."""
    flags = {**script_util.model_and_diffusion_defaults(), **TINY, **overrides}
    torch.manual_seed(seed)
    model = UNet(script_util.model_config(flags)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def tiny_chain(steps: int) -> tuple[Diffusion, Diffusion]:
    base = Diffusion.from_config(DiffusionConfig(diffusion_steps=100, learn_sigma=True))
    return respace(base, select_timesteps(base, steps)), base


def stage(model, sampler="ddpm", steps=4, **kwargs) -> Stage:
    d, base = tiny_chain(steps)
    options = {"ddim": {"eta": 0.7}, "heun": {"s_churn": 3.0, "noise_levels": base}}
    return Stage(
        model_fn=network_fn(model, class_conditional=True),
        diffusion=d,
        shape=(3, 8, 8),
        sampler=sampler,
        options=options.get(sampler, {}),
        **kwargs,
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun"])
def test_same_seed_same_images_at_any_batch_size(sampler):
    model = tiny_unet()
    labels = draw_labels(8, 5, seed=3)
    runs = [
        generate([stage(model, sampler)], num_samples=8, batch_size=b, seed=3, labels=labels)
        for b in (1, 3, 8)
    ]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.images, runs[0].images)
    assert runs[0].images.shape == (8, 8, 8, 3) and runs[0].images.dtype == np.uint8
    assert runs[0].images.std() > 5  # real pictures, not a constant
    other = generate([stage(model, sampler)], num_samples=8, batch_size=8, seed=4, labels=labels)
    assert (other.images != runs[0].images).mean() > 0.5
    # Image i depends on (seed, i) only: the first 3 of 8 are the 3 of a 3-image run.
    three = generate([stage(model, sampler)], num_samples=3, seed=3, labels=labels[:3])
    np.testing.assert_array_equal(three.images, runs[0].images[:3])


def test_labels_cycle_or_are_drawn_per_image_index():
    assert draw_labels(5, 10, seed=0, class_labels=[3, 7]).tolist() == [3, 7, 3, 7, 3]
    many = draw_labels(400, 10, seed=1)
    assert many.dtype == torch.long and set(many.tolist()) == set(range(10))
    assert torch.equal(draw_labels(50, 10, seed=1), many[:50])
    assert not torch.equal(draw_labels(50, 10, seed=2), many[:50])
    with pytest.raises(UserError, match="class label 10 is out of range.*0 to 9"):
        draw_labels(4, 10, seed=0, class_labels=[1, 10])


def test_quantisation_truncates_like_guided_diffusion():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 2.0]).view(1, 1, 2, 4)
    x = x.expand(1, 3, 2, 4)
    images = quantize(x)
    assert images.shape == (1, 2, 4, 3) and images.dtype == torch.uint8
    # (x + 1)·127.5 → 0, 0, 0.1275, 127.5, 191.25, 254.87, 255, 382.5, truncated and clamped.
    assert images[0, :, :, 0].flatten().tolist() == [0, 0, 0, 127, 191, 254, 255, 255]
    back = dequantize(images)
    assert back.shape == (1, 3, 2, 4) and back.min() == -1 and back.max() == 1


def test_cascade_feeds_the_quantised_base_images_and_the_labels_to_the_upsampler():
    seen = {}

    def upsampler_fn(x, t, y=None, low_res=None):
        seen["low_res"], seen["y"] = low_res, y
        return torch.zeros(len(x), 6, 16, 16)

    base = stage(tiny_unet())
    d, _ = tiny_chain(2)
    up = Stage(
        model_fn=upsampler_fn, diffusion=d, shape=(3, 16, 16), noise_stream=2, takes_low_res=True
    )
    labels = torch.tensor([4, 1, 2])
    cascade = generate([base, up], num_samples=3, batch_size=3, seed=5, labels=labels)
    alone = generate([base], num_samples=3, seed=5, labels=labels)
    assert cascade.images.shape == (3, 16, 16, 3) and cascade.num_model_evals == (4, 2)
    torch.testing.assert_close(seen["low_res"], dequantize(alone.images))
    assert torch.equal(seen["y"], labels)


def test_upsampler_stage_reads_given_low_res_images_cyclically():
    flags = {
        **script_util.sr_model_and_diffusion_defaults(),
        **TINY,
        "large_size": 16,
        "small_size": 8,
        "channel_mult": "1,2",
    }
    del flags["image_size"]
    torch.manual_seed(0)
    sr = SuperResUNet(script_util.sr_model_config(flags)).eval()
    d, _ = tiny_chain(3)
    up = Stage(
        model_fn=network_fn(sr, class_conditional=True),
        diffusion=d,
        shape=(3, 16, 16),
        takes_low_res=True,
    )
    low = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    out = generate([up], num_samples=4, batch_size=3, seed=1, low_res=low, labels=labels)
    assert out.images.shape == (4, 16, 16, 3)
    with pytest.raises(ValueError, match="low-resolution"):
        generate([up], num_samples=1, labels=labels[:1])


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = tiny_unet()
    labels = torch.tensor([1, 2])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 60])
    fp32 = network_fn(model, class_conditional=True)(x, t, y=labels)
    bf16 = network_fn(model, class_conditional=True, precision="bf16")(x, t, y=labels)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()
    assert not torch.equal(bf16, fp32)
    with pytest.raises(UserError, match="unknown precision"):
        network_fn(model, class_conditional=True, precision="fp8")


def test_unconditional_networks_never_see_labels():
    model = tiny_unet(class_cond=False)
    fn = network_fn(model, class_conditional=False)
    out = fn(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), y=torch.tensor([0, 1]))
    assert out.shape == (2, 6, 8, 8)


def test_files_are_written_atomically_and_never_overwritten_silently(tmp_path, monkeypatch):
    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4])
    path = tmp_path / "samples.bin"  # any name: the file is an npz whatever its suffix
    save_samples(path, images, labels)
    with np.load(path) as archive:
        assert archive.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(archive["arr_0"], images)
        assert archive["arr_1"].dtype == np.int64
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        save_samples(path, images)
    with pytest.raises(UserError, match="already exists"):
        check_outputs([None, path], overwrite=False)
    check_outputs([path], overwrite=True)
    with pytest.raises(UserError, match="does not exist"):
        check_outputs([tmp_path / "missing" / "x.npz"], overwrite=False)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_samples(tmp_path / "b.npz", images)
    assert sorted(os.listdir(tmp_path)) == ["samples.bin"]  # no partial file left behind
    monkeypatch.undo()
    save_samples(path, images, overwrite=True)
    with np.load(path) as archive:
        assert archive.files == ["arr_0"]
    grid = image_grid(images)
    assert grid.shape == (2 * 64, 3 * 64, 3)  # 2 rows of 3, 8-pixel images enlarged 8x
    np.testing.assert_array_equal(grid[:64:8, :64:8], images[0])
    save_grid(tmp_path / "grid.png", images)
    assert (tmp_path / "grid.png").stat().st_size > 100


SCRIPT = """
import sys
import numpy as np
import torch
sys.path.insert(0, {tests!r})
from test_generate import stage, tiny_unet
from admkit import distributed
from admkit.generate import draw_labels, generate

distributed.setup(torch.device("cpu"))
torch.set_num_threads(1)
result = generate([stage(tiny_unet(), "heun")], num_samples=7, batch_size=2, seed=9,
                  labels=draw_labels(7, 5, seed=9))
if result.images is not None:
    np.save(sys.argv[1], result.images)
distributed.teardown()
distributed.exit_process(0)
"""


def test_two_processes_give_the_images_of_one(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=os.path.dirname(__file__))))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(script), str(tmp_path / "two.npy")]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-3000:]
    two = np.load(tmp_path / "two.npy")
    one = generate(
        [stage(tiny_unet(), "heun")],
        num_samples=7,
        batch_size=3,
        seed=9,
        labels=draw_labels(7, 5, seed=9),
    )
    np.testing.assert_array_equal(two, one.images)
