"""The FID Inception network: TF1 resize, architecture, feature layout and weight loading.

No real weights exist on the test machines, so the network runs with seeded He-normal weights
(``random_inception``) and the checks are identities that hold for any weights.
"""

import math
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from admkit.errors import UserError
from admkit.metrics.inception import (
    InceptionV3FID,
    random_inception,
    spatial_features,
    tf1_resize_bilinear,
    to_inception_input,
)
from admkit.metrics.inception_weights import find_inception_weights, load_inception


@pytest.fixture(scope="module")
def model():
    return random_inception(seed=0)


@pytest.fixture(scope="module")
def images():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8))


@pytest.fixture(scope="module")
def outputs(model, images):
    with torch.inference_mode():
        return model(images)


# ---- TF1 legacy bilinear resize ------------------------------------------------------------


def tf1_legacy_bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """One pixel at a time, from TF1's ResizeBilinear rule (align_corners False, no half pixel)."""
    channels, height, width = image.shape
    out = np.zeros((channels, size, size), dtype=np.float32)
    scale_y, scale_x = np.float32(height / size), np.float32(width / size)
    for i in range(size):
        y = np.float32(i) * scale_y
        y0, y1 = math.floor(y), min(math.ceil(y), height - 1)
        dy = np.float32(y - y0)
        for j in range(size):
            x = np.float32(j) * scale_x
            x0, x1 = math.floor(x), min(math.ceil(x), width - 1)
            dx = np.float32(x - x0)
            top = image[:, y0, x0] + (image[:, y0, x1] - image[:, y0, x0]) * dx
            bottom = image[:, y1, x0] + (image[:, y1, x1] - image[:, y1, x0]) * dx
            out[:, i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("height, width, size", [(7, 5, 12), (32, 32, 299), (40, 23, 17)])
def test_resize_matches_a_pixel_by_pixel_tf1_reference(height, width, size):
    image = np.random.default_rng(1).uniform(0, 255, (2, height, width)).astype(np.float32)
    got = tf1_resize_bilinear(torch.from_numpy(image)[None], size)[0].numpy()
    np.testing.assert_allclose(got, tf1_legacy_bilinear_reference(image, size), atol=1e-4)


def test_resize_keeps_the_corner_and_clamps_the_border():
    # Pixel value 4·y + x is linear, so bilinear interpolation returns 4·y_s + x_s at the
    # (clamped) source position: output i reads source i · 4/8.
    image = torch.arange(16.0).view(1, 1, 4, 4)
    out = tf1_resize_bilinear(image, 8)[0, 0]
    assert out[0, 0] == 0.0
    assert out[5, 5] == 4 * 2.5 + 2.5
    # Position 3.5 has no lower neighbour inside the image: it reads the last row (3), as 3.0 does.
    assert out[7, 7] == 15.0 and torch.equal(out[7], out[6])


def test_resize_is_the_identity_at_299_and_not_torchs_half_pixel_rule():
    image = torch.rand(1, 3, 299, 299) * 255
    assert torch.equal(tf1_resize_bilinear(image, 299), image)
    small = torch.rand(1, 3, 32, 32) * 255
    torch_rule = F.interpolate(small, size=(299, 299), mode="bilinear", align_corners=False)
    assert (tf1_resize_bilinear(small, 299) - torch_rule).abs().max() > 1.0


def test_input_is_scaled_to_minus_one_one():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 4, 4, 3)
    x = to_inception_input(images)
    assert x.shape == (3, 3, 299, 299)
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([-1.0, 0.0, 127 / 128]))


# ---- architecture and features -------------------------------------------------------------


def test_state_dict_has_the_fid_checkpoint_layout(model):
    state = model.state_dict()
    assert len(state) == 566  # 94 conv+bn units × 6 tensors, plus fc.weight and fc.bias
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
        "Mixed_6d.branch7x7_2.conv.weight": (160, 160, 1, 7),
        "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.bn.running_var": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any("AuxLogits" in key for key in state)


def test_forward_shapes_for_uint8_float_and_odd_sizes(model, images, outputs):
    assert outputs.pool_3.shape == (3, 2048)
    assert outputs.mixed_6_conv.shape == (3, 192, 17, 17)
    assert outputs.logits.shape == (3, 1008)
    with torch.inference_mode():
        as_float = model(images[:1].float())
        odd = model(torch.zeros(1, 45, 70, 3, dtype=torch.uint8))
    assert torch.equal(as_float.pool_3, outputs.pool_3[:1])
    assert odd.pool_3.shape == (1, 2048) and odd.mixed_6_conv.shape == (1, 192, 17, 17)


def test_random_weights_give_features_that_do_not_collapse(outputs):
    assert outputs.pool_3.std() > 0.05
    assert outputs.pool_3.std(dim=0).mean() > 1e-3  # features differ between images


def test_features_do_not_depend_on_the_batch(model, images, outputs):
    with torch.inference_mode():
        alone = model(images[2:3])
    torch.testing.assert_close(alone.pool_3, outputs.pool_3[2:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.mixed_6_conv, outputs.mixed_6_conv[2:3], atol=1e-5, rtol=1e-4)


def test_mixed_6_conv_is_the_first_192_channels_of_mixed_6d(model, images, outputs):
    captured = {}
    hook = model.Mixed_6d.register_forward_hook(lambda m, i, out: captured.update(out=out))
    try:
        with torch.inference_mode():
            model(images)
    finally:
        hook.remove()
    assert captured["out"].shape == (3, 768, 17, 17)
    torch.testing.assert_close(captured["out"][:, :192], outputs.mixed_6_conv)


def test_spatial_features_flatten_seven_channels_in_height_width_channel_order(outputs):
    m = outputs.mixed_6_conv
    flat = spatial_features(m)
    assert flat.shape == (3, 2023)
    for n, h, w, c in [(0, 0, 0, 1), (1, 3, 11, 6), (2, 16, 16, 0), (2, 5, 0, 4)]:
        assert flat[n, (h * 17 + w) * 7 + c] == m[n, c, h, w]


def test_logits_have_no_bias(model, outputs):
    assert model.fc.bias.abs().max() > 0.1  # random_inception sets a bias the logits must ignore
    expected = outputs.pool_3.double() @ model.fc.weight.double().t()
    torch.testing.assert_close(outputs.logits.double(), expected, atol=1e-4, rtol=1e-4)


def test_stays_in_eval_mode_without_gradients(model):
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


# ---- finding and loading weights -----------------------------------------------------------


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(model.state_dict(), path)
    return path


def test_round_trip_through_a_saved_state_dict(model, weights_file, images, outputs):
    loaded = load_inception(weights_file)
    assert loaded.has_logits
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.inference_mode():
        assert torch.equal(loaded(images).pool_3, outputs.pool_3)


def test_checkpoints_without_num_batches_tracked_load(model, tmp_path):
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "w.pth")
    assert torch.equal(load_inception(tmp_path / "w.pth").fc.weight, model.fc.weight)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_strict_key_check(model, tmp_path, damage):
    state = dict(model.state_dict())
    if damage == "missing":
        del state["Mixed_6d.branch1x1.conv.weight"]
    elif damage == "unexpected":
        state["AuxLogits.fc.weight"] = torch.zeros(3)
    else:
        state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError, match=damage.replace("shape", "wrong shape")):
        load_inception(tmp_path / "w.pth")


class _Boom:
    def __reduce__(self):
        return (open, ("should-not-exist.txt", "w"))


def test_a_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"fc.weight": _Boom()}, protocol=2))
    with pytest.raises(UserError, match="cannot read Inception weights"):
        load_inception(tmp_path / "evil.pth")
    assert not (tmp_path / "should-not-exist.txt").exists()


def test_lookup_order_path_then_environment_then_hub_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv("ADMKIT_INCEPTION", raising=False)
    with pytest.raises(UserError, match="pytorch-fid/releases/download") as error:
        find_inception_weights()
    assert "\n" not in str(error.value)
    cached = hub / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights() == cached
    from_env = tmp_path / "env.pth"
    from_env.write_bytes(b"x")
    monkeypatch.setenv("ADMKIT_INCEPTION", str(from_env))
    assert find_inception_weights() == from_env
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"x")
    assert find_inception_weights(explicit) == explicit
    with pytest.raises(UserError, match="no such file"):
        find_inception_weights(tmp_path / "absent.pth")
    monkeypatch.setenv("ADMKIT_INCEPTION", str(tmp_path / "absent.pth"))
    with pytest.raises(UserError, match="ADMKIT_INCEPTION"):
        find_inception_weights()


# ---- NVIDIA's TorchScript port -------------------------------------------------------------

# NVIDIA's module path of each convolution -> our module, written out independently of the
# code's TF scope table. Blocks mixed_9/10 keep their towers as flat attribute names.
NVIDIA_NAMES = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
for _tf, _pt in [("mixed", "Mixed_5b"), ("mixed_1", "Mixed_5c"), ("mixed_2", "Mixed_5d")]:
    NVIDIA_NAMES |= {
        f"{_tf}.conv": f"{_pt}.branch1x1",
        f"{_tf}.tower.conv": f"{_pt}.branch5x5_1",
        f"{_tf}.tower.conv_1": f"{_pt}.branch5x5_2",
        f"{_tf}.tower_1.conv": f"{_pt}.branch3x3dbl_1",
        f"{_tf}.tower_1.conv_1": f"{_pt}.branch3x3dbl_2",
        f"{_tf}.tower_1.conv_2": f"{_pt}.branch3x3dbl_3",
        f"{_tf}.tower_2.conv": f"{_pt}.branch_pool",
    }
NVIDIA_NAMES |= {
    "mixed_3.conv": "Mixed_6a.branch3x3",
    "mixed_3.tower.conv": "Mixed_6a.branch3x3dbl_1",
    "mixed_3.tower.conv_1": "Mixed_6a.branch3x3dbl_2",
    "mixed_3.tower.conv_2": "Mixed_6a.branch3x3dbl_3",
}
for _tf, _pt in [("mixed_4", "Mixed_6b"), ("mixed_5", "Mixed_6c"), ("mixed_6", "Mixed_6d")] + [
    ("mixed_7", "Mixed_6e")
]:
    NVIDIA_NAMES |= {f"{_tf}.conv": f"{_pt}.branch1x1", f"{_tf}.tower_2.conv": f"{_pt}.branch_pool"}
    NVIDIA_NAMES |= {
        f"{_tf}.tower.conv{s}": f"{_pt}.branch7x7_{i + 1}" for i, s in enumerate(["", "_1", "_2"])
    }
    NVIDIA_NAMES |= {
        f"{_tf}.tower_1.conv{s}": f"{_pt}.branch7x7dbl_{i + 1}"
        for i, s in enumerate(["", "_1", "_2", "_3", "_4"])
    }
NVIDIA_NAMES |= {
    "mixed_8.tower.conv": "Mixed_7a.branch3x3_1",
    "mixed_8.tower.conv_1": "Mixed_7a.branch3x3_2",
    "mixed_8.tower_1.conv": "Mixed_7a.branch7x7x3_1",
    "mixed_8.tower_1.conv_1": "Mixed_7a.branch7x7x3_2",
    "mixed_8.tower_1.conv_2": "Mixed_7a.branch7x7x3_3",
    "mixed_8.tower_1.conv_3": "Mixed_7a.branch7x7x3_4",
}
for _tf, _pt in [("mixed_9", "Mixed_7b"), ("mixed_10", "Mixed_7c")]:
    NVIDIA_NAMES |= {
        f"{_tf}.conv": f"{_pt}.branch1x1",
        f"{_tf}.tower_conv": f"{_pt}.branch3x3_1",
        f"{_tf}.tower_mixed_conv": f"{_pt}.branch3x3_2a",
        f"{_tf}.tower_mixed_conv_1": f"{_pt}.branch3x3_2b",
        f"{_tf}.tower_1_conv": f"{_pt}.branch3x3dbl_1",
        f"{_tf}.tower_1_conv_1": f"{_pt}.branch3x3dbl_2",
        f"{_tf}.tower_1_mixed_conv": f"{_pt}.branch3x3dbl_3a",
        f"{_tf}.tower_1_mixed_conv_1": f"{_pt}.branch3x3dbl_3b",
        f"{_tf}.tower_2_conv": f"{_pt}.branch_pool",
    }


class _Node(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _NvidiaConv(nn.Module):
    """NVIDIA's conv layer: weight, then batch norm as beta/mean/var (no scale)."""

    def __init__(self, weight, beta, mean, var):
        super().__init__()
        self.weight, self.beta = nn.Parameter(weight), nn.Parameter(beta)
        self.mean, self.var = nn.Parameter(mean), nn.Parameter(var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _nvidia_torchscript(model: InceptionV3FID, path, with_output: bool) -> None:
    """Save ``model``'s tensors in the layout of NVIDIA's TorchScript port."""
    state = model.state_dict()
    root = _Node()
    root.layers = _Node()
    for nvidia, ours in NVIDIA_NAMES.items():
        parent = root.layers
        *parents, leaf = nvidia.split(".")
        for name in parents:
            if not hasattr(parent, name):
                setattr(parent, name, _Node())
            parent = getattr(parent, name)
        fields = [f"{ours}.conv.weight"] + [
            f"{ours}.bn.{f}" for f in ("bias", "running_mean", "running_var")
        ]
        setattr(parent, leaf, _NvidiaConv(*(state[f].clone() for f in fields)))
    if with_output:
        root.output = nn.Linear(2048, 1008)
        root.output.weight.data.copy_(state["fc.weight"])
        root.output.bias.data.copy_(state["fc.bias"])
    torch.jit.script(root).save(str(path))


@pytest.fixture(scope="module")
def bn_free_model():
    """random_inception with batch-norm scales 1 and random shifts: what NVIDIA's port can hold."""
    model = random_inception(seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.normal_(0, 0.1, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_nvidia_torchscript_port_is_remapped(bn_free_model, tmp_path, images):
    assert len(NVIDIA_NAMES) == 94
    path = tmp_path / "inception-2015-12-05.pt"
    _nvidia_torchscript(bn_free_model, path, with_output=True)
    loaded = load_inception(path)
    assert loaded.has_logits
    for key, value in bn_free_model.state_dict().items():
        if "num_batches_tracked" not in key:
            assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_nvidia_port_without_output_layer_has_no_logits(bn_free_model, tmp_path):
    path = tmp_path / "default_1.pt"
    _nvidia_torchscript(bn_free_model, path, with_output=False)
    loaded = load_inception(path)
    assert not loaded.has_logits
    assert torch.equal(loaded.Mixed_6d.branch1x1.bn.bias, bn_free_model.Mixed_6d.branch1x1.bn.bias)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_reader_runs_no_code_from_the_archive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "port.pt"
    _nvidia_torchscript(random_inception(seed=5), path, with_output=False)
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(evil, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("/data.pkl"):
                data = pickle.dumps({"layers": _Boom()}, protocol=2)
            target.writestr(name, data)
    with pytest.raises(UserError, match="cannot read TorchScript"):
        load_inception(evil)
    assert not (tmp_path / "should-not-exist.txt").exists()
