"""The FID Inception-v3 network: TensorFlow's 2015 ``classify_image_graph_def.pb`` in plain PyTorch.

guided-diffusion's evaluator feeds float NHWC images in [0, 255] into that graph, which resizes
them to 299×299 with TF1's legacy bilinear rule and maps them to [-1, 1) before the network
(``reference/evaluation.md`` §1.1). This module reproduces that path and returns, in one forward,
the three tensors the metrics read:

| name            | TF tensor                      | shape            | used by                 |
| --------------- | ------------------------------ | ---------------- | ----------------------- |
| ``pool_3``      | ``pool_3:0``                   | [N, 2048]        | FID, precision, recall  |
| ``mixed_6_conv``| ``mixed_6/conv:0``             | [N, 192, 17, 17] | sFID (7 channels, HWC)  |
| ``logits``      | ``pool_3 @ softmax/weights``   | [N, 1008]        | Inception Score         |

Module names follow the pytorch-fid / torch-fidelity checkpoint
(``pt_inception-2015-12-05-6726825d.pth``), so that file loads with a strict key check
(``inception_weights.py`` finds and reads it). Each block also records the TF scope of every
convolution, which maps NVIDIA's TorchScript port onto the same modules.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INCEPTION_SIZE = 299
NUM_CLASSES = 1008
POOL_FEATURES = 2048
SPATIAL_CHANNELS = 7
SPATIAL_FEATURES = 17 * 17 * SPATIAL_CHANNELS  # 2023


# ---------------------------------------------------------------------------------------------
# Input path: TF1 legacy bilinear resize, then (x - 128) / 128.


def _legacy_source_indices(in_size: int, out_size: int, device: torch.device):
    """TF1 ``ResizeBilinear`` (align_corners False, no half-pixel centres) sampling positions.

    Output index ``i`` reads source position ``i * in_size / out_size`` (scale in float32, as TF
    computes it): neighbours ``floor`` and ``ceil`` (the upper one clamped to the border) and the
    fractional part as the interpolation weight. No antialiasing, even when shrinking.
    """
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    position = torch.arange(out_size, dtype=torch.float32) * scale
    lower = position.floor()
    upper = position.ceil().clamp(max=in_size - 1)
    weight = position - lower
    return lower.long().to(device), upper.long().to(device), weight.to(device)


def tf1_resize_bilinear(x: Tensor, size: int) -> Tensor:
    """Resize [N, C, H, W] float images to [N, C, size, size] exactly as TF1 legacy bilinear does.

    This is not ``F.interpolate(mode="bilinear")``: torch samples at half-pixel centres, which
    moves FID features by up to ~1.5 (``reference/evaluation.md`` §6).
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float [N, C, H, W] tensor, got {tuple(x.shape)} {x.dtype}")
    y0, y1, wy = _legacy_source_indices(x.shape[2], size, x.device)
    x0, x1, wx = _legacy_source_indices(x.shape[3], size, x.device)
    wy = wy.to(x.dtype).view(1, 1, size, 1)
    wx = wx.to(x.dtype).view(1, 1, 1, size)
    rows_top, rows_bottom = x.index_select(2, y0), x.index_select(2, y1)
    # TF's order of operations: interpolate along width on both rows, then along height.
    top_left, top_right = rows_top.index_select(3, x0), rows_top.index_select(3, x1)
    bottom_left, bottom_right = rows_bottom.index_select(3, x0), rows_bottom.index_select(3, x1)
    top = top_left + (top_right - top_left) * wx
    bottom = bottom_left + (bottom_right - bottom_left) * wx
    return top + (bottom - top) * wy


def to_inception_input(images: Tensor) -> Tensor:
    """Images [N, H, W, 3] (uint8, or float in [0, 255]) to the network input [N, 3, 299, 299].

    The result lies in [-1, 1): the graph subtracts 128 and multiplies by 1/128 after resizing.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {tuple(images.shape)}")
    x = images.to(torch.float32).permute(0, 3, 1, 2)
    x = tf1_resize_bilinear(x, INCEPTION_SIZE)
    return (x - 128.0) / 128.0


# ---------------------------------------------------------------------------------------------
# The network. Class and attribute names follow torchvision's Inception3 so the standard FID
# checkpoint loads key for key; TF_NAMES gives each convolution's scope inside the TF graph.


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, TF's), ReLU: one TF ``conv`` scope."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    # TF's average pool with SAME padding divides by the number of real pixels in the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35×35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``)."""

    TF_NAMES = {
        "branch1x1": "conv",
        "branch5x5_1": "tower/conv",
        "branch5x5_2": "tower/conv_1",
        "branch3x3dbl_1": "tower_1/conv",
        "branch3x3dbl_2": "tower_1/conv_1",
        "branch3x3dbl_3": "tower_1/conv_2",
        "branch_pool": "tower_2/conv",
    }

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class BlockB(nn.Module):
    """Reduction 35→17 (TF ``mixed_3``)."""

    TF_NAMES = {
        "branch3x3": "conv",
        "branch3x3dbl_1": "tower/conv",
        "branch3x3dbl_2": "tower/conv_1",
        "branch3x3dbl_3": "tower/conv_2",
    }

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), branch3x3dbl, branch_pool], 1)


class BlockC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (TF ``mixed_4`` … ``mixed_7``).

    ``branch1x1`` of the third of these (TF ``mixed_6``) is the sFID tensor ``mixed_6/conv``.
    """

    TF_NAMES = {
        "branch1x1": "conv",
        "branch7x7_1": "tower/conv",
        "branch7x7_2": "tower/conv_1",
        "branch7x7_3": "tower/conv_2",
        "branch7x7dbl_1": "tower_1/conv",
        "branch7x7dbl_2": "tower_1/conv_1",
        "branch7x7dbl_3": "tower_1/conv_2",
        "branch7x7dbl_4": "tower_1/conv_3",
        "branch7x7dbl_5": "tower_1/conv_4",
        "branch_pool": "tower_2/conv",
    }

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_3x3(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class BlockD(nn.Module):
    """Reduction 17→8 (TF ``mixed_8``)."""

    TF_NAMES = {
        "branch3x3_1": "tower/conv",
        "branch3x3_2": "tower/conv_1",
        "branch7x7x3_1": "tower_1/conv",
        "branch7x7x3_2": "tower_1/conv_1",
        "branch7x7x3_3": "tower_1/conv_2",
        "branch7x7x3_4": "tower_1/conv_3",
    }

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(branch7x7x3)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class BlockE(nn.Module):
    """8×8 block with split 1×3 / 3×1 branches (TF ``mixed_9``, ``mixed_10``).

    The last block (``mixed_10``) pools its pool branch with a 3×3 *max* pool where torchvision
    uses an average: the TF graph does, so the FID network must too.
    """

    TF_NAMES = {
        "branch1x1": "conv",
        "branch3x3_1": "tower/conv",
        "branch3x3_2a": "tower/mixed/conv",
        "branch3x3_2b": "tower/mixed/conv_1",
        "branch3x3dbl_1": "tower_1/conv",
        "branch3x3dbl_2": "tower_1/conv_1",
        "branch3x3dbl_3a": "tower_1/mixed/conv",
        "branch3x3dbl_3b": "tower_1/mixed/conv_1",
        "branch_pool": "tower_2/conv",
    }

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_3x3(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(branch3x3),
                self.branch3x3_2b(branch3x3),
                self.branch3x3dbl_3a(branch3x3dbl),
                self.branch3x3dbl_3b(branch3x3dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


class InceptionOutputs(NamedTuple):
    """What one forward of :class:`InceptionV3FID` returns."""

    pool_3: Tensor  # [N, 2048]
    mixed_6_conv: Tensor  # [N, 192, 17, 17]
    logits: Tensor  # [N, 1008], pool_3 @ fc.weightᵀ without the bias (the evaluator's IS logits)


# module name -> TF scope, for the stem; blocks are added from their TF_NAMES.
_STEM_TF_NAMES = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_BLOCK_TF_SCOPES = {
    "Mixed_5b": ("mixed", BlockA),
    "Mixed_5c": ("mixed_1", BlockA),
    "Mixed_5d": ("mixed_2", BlockA),
    "Mixed_6a": ("mixed_3", BlockB),
    "Mixed_6b": ("mixed_4", BlockC),
    "Mixed_6c": ("mixed_5", BlockC),
    "Mixed_6d": ("mixed_6", BlockC),
    "Mixed_6e": ("mixed_7", BlockC),
    "Mixed_7a": ("mixed_8", BlockD),
    "Mixed_7b": ("mixed_9", BlockE),
    "Mixed_7c": ("mixed_10", BlockE),
}


class InceptionV3FID(nn.Module):
    """The FID Inception-v3 of TF's 2015 graph: images in, ``InceptionOutputs`` out.

    Always in eval mode with frozen parameters: batch norm in training mode ruins FID.
    ``has_logits`` is False when the weights came from a file without the 1008-class layer.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_FEATURES, NUM_CLASSES)
        self.has_logits = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionV3FID:
        return super().train(False)

    def forward(self, images: Tensor) -> InceptionOutputs:
        """Images [N, H, W, 3] (uint8, or float in [0, 255]; any H, W) to the three features."""
        x = to_inception_input(images.to(self.fc.weight.device))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_6c(
            self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))))
        )
        # Mixed_6d's 1×1 branch runs again inside the block; recomputing it keeps the block plain
        # and costs under 1% of the forward.
        mixed_6_conv = self.Mixed_6d.branch1x1(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool_3 = x.mean(dim=(2, 3))  # TF's 8×8 VALID average pool
        logits = pool_3 @ self.fc.weight.t()  # the evaluator drops softmax/biases
        return InceptionOutputs(pool_3, mixed_6_conv, logits)


def spatial_features(mixed_6_conv: Tensor) -> Tensor:
    """sFID features: the first 7 channels of [N, 192, 17, 17], flattened in H, W, C order.

    The TF tensor is NHWC and the evaluator slices ``[..., :7]`` before reshaping to [N, 2023];
    flattening NCHW directly gives a different (wrong) vector order.
    """
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(mixed_6_conv), -1)


def tf_scope_names() -> dict[str, str]:
    """Each convolution's module prefix (``Mixed_6d.branch1x1``) -> TF scope (``mixed_6/conv``)."""
    names = dict(_STEM_TF_NAMES)
    for block_name, (scope, block_class) in _BLOCK_TF_SCOPES.items():
        for branch, sub_scope in block_class.TF_NAMES.items():
            names[f"{block_name}.{branch}"] = f"{scope}/{sub_scope}"
    return names


def random_inception(seed: int = 0) -> InceptionV3FID:
    """An InceptionV3FID with seeded random weights whose features do not collapse.

    PyTorch's default init shrinks activations through 94 layers (pool_3 std about 4e-8), so
    convolutions get He-normal weights and batch norms the identity; for tests and benchmarks.
    """
    generator = torch.Generator().manual_seed(seed)
    model = InceptionV3FID()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
        model.fc.weight.normal_(0.0, POOL_FEATURES**-0.5, generator=generator)
        model.fc.bias.normal_(0.0, 1.0, generator=generator)
    return model
