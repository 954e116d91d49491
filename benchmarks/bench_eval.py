"""Evaluation-suite throughput: Inception feature extraction and the statistics of N samples.

Runs with seeded random Inception weights (the real file is not needed for timing) and prints
one JSON line per measurement:

- ``inception_features``: images/s of the full forward (TF1 resize to 299, pool_3, mixed_6/conv,
  logits) at a given batch size and input size;
- ``statistics``: seconds for what ``admkit evaluate`` does after the features exist, on random
  stand-in features of N reference and N sample images: the Gaussian statistics (FID and sFID),
  the two Fréchet distances (scipy sqrtm of 2048² and 2023² matrices), the Inception Score and
  precision/recall (float16-first distance blocks).

    python benchmarks/bench_eval.py --device cuda --batch_size 64 --num_samples 10000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from admkit.metrics.fid import RunningStatistics, frechet_distance, statistics_of
from admkit.metrics.inception import POOL_FEATURES, SPATIAL_FEATURES, random_inception
from admkit.metrics.inception_score import class_probabilities, inception_score
from admkit.metrics.precision_recall import precision_recall


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_features(model, device, batch_size: int, num_images: int, image_size: int) -> dict:
    images = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8)
    with torch.inference_mode():
        model(images)  # warm-up: kernels, allocator
        synchronize(device)
        start = time.perf_counter()
        done = 0
        while done < num_images:
            model(images)
            done += batch_size
        synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "bench": "inception_features",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "float32",
        "batch_size": batch_size,
        "image_size": image_size,
        "num_images": done,
        "images_per_s": round(done / seconds, 2),
    }


def bench_statistics(model, device, num_samples: int) -> dict:
    rng = np.random.default_rng(0)
    # Stand-in features with ReLU-like, correlated structure (random features from the real
    # network would cost num_samples forwards and time the same arithmetic).
    mixing = rng.normal(size=(64, POOL_FEATURES)).astype(np.float32) / 8
    pool = [
        np.maximum(rng.normal(size=(num_samples, 64)).astype(np.float32) @ mixing, 0) for _ in "rs"
    ]
    spatial = [np.maximum(rng.normal(size=(num_samples, SPATIAL_FEATURES)), 0) for _ in "rs"]
    timings = {}

    start = time.perf_counter()
    pool_stats = [statistics_of(features) for features in pool]
    spatial_stats = []
    for features in spatial:
        # As in extract_features: batches of 64 already on the device, accumulated there.
        features = torch.from_numpy(features).to(device, torch.float32)
        running = RunningStatistics(SPATIAL_FEATURES, device=device)
        for begin in range(0, num_samples, 64):
            running.update(features[begin : begin + 64])
        spatial_stats.append(running.statistics())
    timings["gaussian_statistics_s"] = time.perf_counter() - start

    start = time.perf_counter()
    frechet_distance(pool_stats[1], pool_stats[0])
    frechet_distance(spatial_stats[1], spatial_stats[0])
    timings["frechet_distances_s"] = time.perf_counter() - start

    start = time.perf_counter()
    inception_score(class_probabilities(pool[1], model.fc.weight))
    synchronize(device)
    timings["inception_score_s"] = time.perf_counter() - start

    start = time.perf_counter()
    precision_recall(pool[0], pool[1], device=device)
    synchronize(device)
    timings["precision_recall_s"] = time.perf_counter() - start

    return {
        "bench": "statistics",
        "device": str(device),
        "num_reference": num_samples,
        "num_samples": num_samples,
        **{key: round(value, 3) for key, value in timings.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument("--num_images", "--num-images", type=int, default=128)
    parser.add_argument("--image_size", "--image-size", type=int, default=256)
    parser.add_argument("--num_samples", "--num-samples", type=int, default=2000)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = random_inception(seed=0).to(device)
    print(
        json.dumps(bench_features(model, device, args.batch_size, args.num_images, args.image_size))
    )
    print(json.dumps(bench_statistics(model, device, args.num_samples)))


if __name__ == "__main__":
    main()
