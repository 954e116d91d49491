"""Data loading throughput: how many training images/s ``admkit train``'s loader delivers from a
folder of image files, per number of loading processes, to set against the model's images/s.

Writes ``--num_images`` files of ``--source_size`` (width × height, JPEG or PNG) into a
temporary folder, then reads ``--batches`` global batches through the training loader
(``admkit.data.iterate_batches`` over an ``ImageFolderDataset`` with random flips, as ``admkit
train --data FOLDER`` does: decode, resize to the short side, centre crop, flip, to [-1, 1])
with each ``--workers`` count. The images are smooth random fields (a coarse noise grid
upscaled, plus fine noise), so JPEG decoding costs what photographs of that size cost, not what a
flat image would. One JSON line per worker count: images/s after the first batch (the startup,
reported apart, is paid once per run).

    python benchmarks/bench_data.py                                  # 64 px from 500x375 JPEGs
    python benchmarks/bench_data.py --image_size 256 --workers 0,2,4,8
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from admkit.data.batches import iterate_batches  # noqa: E402
from admkit.data.images import ImageFolderDataset  # noqa: E402
from common import emit  # noqa: E402


def write_images(folder: Path, count: int, width: int, height: int, suffix: str) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            folder / f"class{i % 10}_{i:05d}{suffix}", quality=90
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--source_size", default="500x375", help="WIDTHxHEIGHT of the files")
    parser.add_argument("--format", default="jpg", choices=("jpg", "png"))
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24, help="timed batches (after the first)")
    parser.add_argument("--workers", default="0,2", help="comma-separated loading process counts")
    args = parser.parse_args()
    width, height = (int(side) for side in args.source_size.lower().split("x"))
    with tempfile.TemporaryDirectory() as folder:
        write_images(Path(folder), args.num_images, width, height, "." + args.format)
        dataset = ImageFolderDataset(folder, args.image_size, random_flip=True)
        for workers in (int(w) for w in args.workers.split(",")):
            start = time.perf_counter()
            batches = iterate_batches(
                dataset, args.batch_size, stop_step=args.batches + 1, num_workers=workers
            )
            images, _ = next(batches)
            first = time.perf_counter() - start
            start = time.perf_counter()
            count = sum(len(images) for images, _ in batches)
            seconds = time.perf_counter() - start
            emit(
                dict(
                    bench="data",
                    device=f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                    image_size=args.image_size,
                    source=f"{width}x{height} {args.format}",
                    batch_size=args.batch_size,
                    workers=workers,
                    images_per_s=round(count / seconds, 1),
                    first_batch_s=round(first, 2),
                )
            )


if __name__ == "__main__":
    main()
