"""``admkit ref-batch DATA --out ref.npz``: a reference batch for ``admkit evaluate``.

DATA is an image folder (searched recursively for jpg, jpeg, png, gif and webp files, in sorted
order) or an .npz batch. Images are centre-cropped to ``--image_size`` with guided-diffusion's
recipe (halve with a box filter while the short side is at least twice the target, then one
bicubic resize and a centre crop) and written as ``arr_0`` uint8 [N, H, W, 3]. ``--with_stats``
also stores the Inception statistics ``mu``, ``sigma``, ``mu_s``, ``sigma_s``, as in the released
reference batches, so later evaluations use them instead of recomputing from ``arr_0``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from admkit import distributed
from admkit.data import center_crop_arr, list_image_files
from admkit.errors import UserError
from admkit.metrics.evaluate import (
    FEATURE_BATCH_SIZE,
    ArrayImages,
    NpzImages,
    reference_statistics,
    write_reference_batch,
)
from admkit.metrics.inception_weights import ENV_VAR, load_inception


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Make a reference batch (.npz with arr_0, optionally mu, sigma, mu_s, "
        "sigma_s) from an image folder or an .npz batch.",
    )
    parser.add_argument("data", metavar="DATA", help="image folder or .npz batch")
    parser.add_argument("--out", required=True, metavar="REF.npz", help="file to write")
    parser.add_argument(
        "--image_size",
        "--image-size",
        type=int,
        help="centre-crop images to this size (needed for a folder; optional for an .npz)",
    )
    parser.add_argument(
        "--with_stats",
        "--with-stats",
        action="store_true",
        help="also store the Inception statistics (needs the weights)",
    )
    parser.add_argument(
        "--inception_weights",
        "--inception-weights",
        metavar="PATH",
        help=f"FID Inception weights for --with_stats (default: ${ENV_VAR}, then the hub cache)",
    )
    parser.add_argument("--batch_size", "--batch-size", type=int, default=FEATURE_BATCH_SIZE)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(run=run)
    return parser


def read_folder(folder: Path, image_size: int) -> np.ndarray:
    """Every readable image of ``folder``, centre-cropped: [N, S, S, 3] uint8."""
    files = list_image_files(folder)
    if not files:
        raise UserError(f"{folder} holds no jpg/jpeg/png/gif/webp images")
    images = []
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                images.append(center_crop_arr(image.convert("RGB"), image_size))
        except (UnidentifiedImageError, OSError) as error:
            print(f"warning: skipping unreadable image {path} ({error})", file=sys.stderr)
    if not images:
        raise UserError(f"none of the {len(files)} image files in {folder} could be read")
    return np.stack(images)


def read_npz(path: Path, image_size: int | None) -> np.ndarray:
    """``arr_0`` of an .npz batch, centre-cropped to ``image_size`` when it differs."""
    batch = NpzImages(path)
    images = np.concatenate(list(batch.batches(0, len(batch), 1024)))
    if image_size is None or images.shape[1:3] == (image_size, image_size):
        return images
    return np.stack([center_crop_arr(Image.fromarray(image), image_size) for image in images])


def run(args: argparse.Namespace) -> int:
    data, out = Path(args.data), Path(args.out)
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image_size {args.image_size}: must be a positive number of pixels")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it")
    if data.is_dir():
        if args.image_size is None:
            raise UserError("an image folder needs --image_size (the side of the square crop)")
        images = read_folder(data, args.image_size)
    elif data.is_file():
        images = read_npz(data, args.image_size)
    else:
        raise UserError(f"{data}: no such folder or .npz file")
    statistics = None
    if args.with_stats:
        device = distributed.setup(distributed.select_device(args.device))
        try:
            model = load_inception(args.inception_weights, device)
            statistics = reference_statistics(ArrayImages(images), model, args.batch_size)
        finally:
            distributed.teardown()
    if distributed.launch_env().rank != 0:
        return 0  # under torchrun, rank 0 writes the file
    write_reference_batch(out, images, statistics)
    stored = "arr_0, mu, sigma, mu_s, sigma_s" if statistics else "arr_0"
    print(f"wrote {out}: {len(images)} images of {images.shape[1]}x{images.shape[2]} ({stored})")
    return 0
