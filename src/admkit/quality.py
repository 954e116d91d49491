"""Scoring a batch of samples: the paper's evaluator against a reference batch, or, for the
built-in digits, the independent digits judge against the held-out digits.

``admkit sweep``, training-time evaluation (``--sample_every``) and the demo score samples many
times against one reference; a scorer embeds the reference once and then scores each batch:

* ``InceptionScorer`` (``--ref REF.npz``): ``inception_score``, ``fid``, ``sfid``,
  ``precision``, ``recall`` — the names of ``admkit evaluate --json``;
* ``DigitsScorer`` (``--judge digits``): ``frechet_distance``, ``precision``, ``recall`` in the
  judge's features, and ``judged_accuracy``, the share of samples the judge reads as the label
  they were drawn for (NaN without labels).

Scorers run in the calling process only (no torch.distributed collectives), so each process of
a sharded job can score its own batches.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from admkit.checkpoint import atomic_path
from admkit.data import digits_heldout, digits_train
from admkit.generate import dequantize
from admkit.judge import JUDGE_SIZE, DigitJudge, judge_outputs, train_judge
from admkit.metrics.evaluate import (
    FEATURE_BATCH_SIZE,
    ArrayImages,
    compare_features,
    extract_features,
    open_batch,
    read_precomputed_statistics,
)
from admkit.metrics.fid import frechet_distance, statistics_of
from admkit.metrics.inception_weights import load_inception
from admkit.metrics.precision_recall import precision_recall

JUDGES = ("digits",)
JUDGE_STEPS = 400  # as the demo trains it: ~99% accuracy on the held-out digits
JUDGE_SEED = 0
INCEPTION_METRICS = ("inception_score", "fid", "sfid", "precision", "recall")
DIGITS_METRICS = ("frechet_distance", "precision", "recall", "judged_accuracy")


class Scorer(Protocol):
    """Scores uint8 ``[N, H, W, 3]`` samples (with the labels they were drawn for, if any)."""

    metrics: tuple[str, ...]

    def score(self, images: np.ndarray, labels: np.ndarray | None) -> dict[str, float]: ...


def _stack_images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def digits_judge(path: str | os.PathLike | None = None, steps: int = JUDGE_STEPS) -> DigitJudge:
    """The digits judge: read from ``path`` when it exists, else trained for ``steps`` steps (a
    few seconds on a CPU, seeded) and written there. Scores made with one judge are comparable.
    """
    judge = DigitJudge()
    if path is not None and Path(path).exists():
        judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return judge.eval()
    train = digits_train(JUDGE_SIZE)
    labels = torch.as_tensor(np.asarray(train.labels))
    judge = train_judge(_stack_images(train), labels, steps=steps, seed=JUDGE_SEED)
    if path is not None:
        with atomic_path(path, overwrite=True) as temporary:
            torch.save(judge.state_dict(), temporary)
    return judge


class DigitsScorer:
    """Fréchet distance, precision and recall in the judge's features against the 360 held-out
    digits, and the judged accuracy of labelled samples."""

    metrics = DIGITS_METRICS

    def __init__(self, judge: DigitJudge) -> None:
        self.judge = judge.eval()
        self.reference, _ = judge_outputs(self.judge, _stack_images(digits_heldout(JUDGE_SIZE)))
        self.reference_statistics = statistics_of(self.reference)

    def score(self, images: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
        features, predicted = judge_outputs(self.judge, dequantize(images))
        precision, recall = precision_recall(self.reference, features)
        accuracy = float("nan")
        if labels is not None:
            accuracy = float((predicted == np.asarray(labels)).mean())
        with warnings.catch_warnings():
            # Judge features that are zero for every image (ReLU units no digit excites) make
            # both covariances singular; the distance is still defined, scipy warns anyway.
            warnings.filterwarnings("ignore", "Matrix is singular")
            distance = frechet_distance(statistics_of(features), self.reference_statistics)
        return {
            "frechet_distance": float(distance),
            "precision": float(precision),
            "recall": float(recall),
            "judged_accuracy": accuracy,
        }


class InceptionScorer:
    """guided-diffusion's five numbers against a reference batch, embedded once."""

    metrics = INCEPTION_METRICS

    def __init__(
        self,
        reference_path: str | os.PathLike,
        inception_weights: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = FEATURE_BATCH_SIZE,
        progress: bool = False,
    ) -> None:
        reference = open_batch(reference_path, "reference")
        self.precomputed = read_precomputed_statistics(reference_path)
        self.model = load_inception(inception_weights, device)
        self.batch_size = batch_size
        self.reference = extract_features(
            reference, self.model, batch_size, "reference", progress, shard=False
        )

    def score(self, images: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
        del labels  # the evaluator's numbers do not use them
        features = extract_features(
            ArrayImages(images), self.model, self.batch_size, progress=False, shard=False
        )
        result = compare_features(self.reference, features, self.model, self.precomputed)
        values = result.as_dict()
        return {
            name: float("nan") if values[name] is None else float(values[name])
            for name in INCEPTION_METRICS
        }
