"""The built-in ``digits`` data: 1,797 handwritten 8×8 digits in 10 classes (see DIGITS.md).

The file ``digits.npz`` beside this module holds ``images`` (uint8 ``[1797, 8, 8]``, ink
intensity 0..16, white digit on black) and ``labels`` (int64 ``[1797]``, the digit 0..9). It is
served at any ``image_size`` as three equal RGB channels in [−1, 1].

A fixed, seeded 80/20 split by index gives a ``train`` part and a ``heldout`` part, so a judge
classifier and reference statistics can come from images the generative model never saw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from admkit.data.images import ImageDataset, check_image_size

DIGITS_FILE = Path(__file__).with_name("digits.npz")
NUM_DIGITS = 1797
MAX_INTENSITY = 16
NUM_HELDOUT = 360  # 20% of 1,797, rounded to a round number
# Changing this seed changes which digits are held out, and so every figure measured on them.
SPLIT_SEED = 20210511

Part = Literal["all", "train", "heldout"]


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw data: images uint8 ``[1797, 8, 8]`` (0..16) and labels int64 ``[1797]``."""
    with np.load(DIGITS_FILE, allow_pickle=False) as archive:
        return archive["images"], archive["labels"].astype(np.int64)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``train`` (1,437) and ``heldout`` (360) parts, each sorted ascending.

    A permutation from a fixed seed, so the split is the same on every machine and run.
    """
    # RandomState's permutation is frozen by numpy's compatibility policy (NEP 19), unlike
    # Generator's, so the split survives numpy upgrades.
    order = np.random.RandomState(SPLIT_SEED).permutation(NUM_DIGITS)
    return np.sort(order[NUM_HELDOUT:]), np.sort(order[:NUM_HELDOUT])


def resize_digits(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 ``[N, 8, 8]`` intensities 0..16 → float32 ``[N, S, S]`` in [−1, 1].

    Bicubic (antialiased when shrinking) on the float intensities, so enlarged digits stay smooth
    instead of blocky; its overshoot at strokes' edges is clipped back into the data's range.
    """
    x = torch.from_numpy(images).to(torch.float32)[:, None] / (MAX_INTENSITY / 2) - 1.0
    if image_size != x.shape[-1]:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True
        )
        x = x.clamp(-1.0, 1.0)
    return x[:, 0].contiguous()


class DigitsDataset(ImageDataset):
    """The built-in digits at ``image_size``: items ``(image [3, S, S] in [−1, 1], digit)``.

    ``part`` picks all 1,797 digits, the ``train`` part or the ``heldout`` part of
    ``digits_split()``. ``indices`` maps item positions to rows of the full data.
    """

    def __init__(self, image_size: int, *, part: Part = "all", random_flip: bool = False) -> None:
        check_image_size(image_size)
        images, labels = load_digits_arrays()
        if part == "all":
            self.indices = np.arange(len(images))
        elif part in ("train", "heldout"):
            self.indices = digits_split()[0 if part == "train" else 1]
        else:
            raise ValueError(f"part must be 'all', 'train' or 'heldout', got {part!r}")
        # Small enough to resize once up front (1,797 × 64² floats is under 30 MB).
        self.grey = resize_digits(images[self.indices], image_size)
        self.labels = labels[self.indices]
        self.class_names = [str(digit) for digit in range(10)]
        self.image_size = image_size
        self.random_flip = random_flip
        self.part = part
        self.source = "digits" if part == "all" else f"digits:{part}"

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.grey[index].expand(3, -1, -1).clone(), int(self.labels[index])


def digits_train(image_size: int, *, random_flip: bool = False) -> DigitsDataset:
    """The training part of the built-in digits (1,437 images)."""
    return DigitsDataset(image_size, part="train", random_flip=random_flip)


def digits_heldout(image_size: int) -> DigitsDataset:
    """The held-out part of the built-in digits (360 images), never flipped."""
    return DigitsDataset(image_size, part="heldout")
