"""Training data: image folders, ``.npz`` arrays, the built-in digits, batches and low-res pairs.

- ``open_dataset(spec, image_size)`` turns ``--data`` into a dataset (``images``, ``digits``).
- ``iterate_batches`` / ``StepBatchSampler`` give reproducible, resumable, rank-sharded batches
  (``batches``).
- ``make_low_res`` / ``augment_low_res`` give an upsampler's conditioning (``lowres``).
"""

from __future__ import annotations

import os
from pathlib import Path

from admkit.data.batches import (
    StepBatchSampler,
    epoch_permutation,
    iterate_batches,
    step_flips,
)
from admkit.data.digits import (
    DigitsDataset,
    digits_heldout,
    digits_split,
    digits_train,
    load_digits_arrays,
)
from admkit.data.images import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    ImageFolderDataset,
    NpzDataset,
    center_crop_arr,
    class_name_of,
    list_image_files,
    read_npz_images,
)
from admkit.data.lowres import augment_low_res, gaussian_blur, make_low_res
from admkit.errors import UserError

DIGITS_SPECS = {"digits": "all", "digits:train": "train", "digits:heldout": "heldout"}


def open_dataset(
    spec: str | os.PathLike,
    image_size: int,
    *,
    random_flip: bool = False,
    strict_size: bool = False,
) -> ImageDataset:
    """The dataset that ``--data spec`` names, served at ``image_size``.

    ``spec`` is ``digits`` (also ``digits:train`` / ``digits:heldout``, the fixed 80/20 split),
    a path to an ``.npz`` file, or a path to an image folder. ``strict_size`` turns images
    smaller than ``image_size`` from a warning into an error.
    """
    text = os.fspath(spec)
    if text in DIGITS_SPECS:
        return DigitsDataset(image_size, part=DIGITS_SPECS[text], random_flip=random_flip)
    path = Path(text)
    if path.suffix.lower() == ".npz":
        return NpzDataset(path, image_size, random_flip=random_flip, strict_size=strict_size)
    if path.is_dir():
        return ImageFolderDataset(
            path, image_size, random_flip=random_flip, strict_size=strict_size
        )
    if path.exists():
        raise UserError(f"data {path} is a file but not an .npz: give an image folder instead")
    raise UserError(f"data {text!r} not found: give an image folder, an .npz file or 'digits'")


__all__ = [
    "DIGITS_SPECS",
    "IMAGE_EXTENSIONS",
    "DigitsDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "NpzDataset",
    "StepBatchSampler",
    "augment_low_res",
    "center_crop_arr",
    "class_name_of",
    "digits_heldout",
    "digits_split",
    "digits_train",
    "epoch_permutation",
    "gaussian_blur",
    "iterate_batches",
    "list_image_files",
    "load_digits_arrays",
    "make_low_res",
    "open_dataset",
    "read_npz_images",
    "step_flips",
]
