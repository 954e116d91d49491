"""The paper's evaluation suite in PyTorch: Inception Score, FID, sFID, precision and recall.

Same definitions as guided-diffusion's ``evaluations/evaluator.py`` (``reference/evaluation.md``):

- ``inception.py``: the FID Inception-v3 (TF 2015 graph), TF1 resize, the three feature tensors;
- ``inception_weights.py``: finding and reading its weights (no code is executed from files);
- ``fid.py``: Gaussian statistics and the Fréchet distance (FID on pool_3, sFID on mixed_6/conv);
- ``inception_score.py``: the Inception Score over consecutive 5,000-sample splits;
- ``precision_recall.py``: Kynkäänniemi et al.'s k = 3 manifold estimator;
- ``evaluate.py``: npz batches in, the five numbers out.

Nothing here imports model code.
"""

from admkit.metrics.evaluate import (
    ArrayImages,
    EvaluationResult,
    NpzImages,
    evaluate,
    extract_features,
    read_precomputed_statistics,
    reference_statistics,
    write_reference_batch,
)
from admkit.metrics.fid import (
    GaussianStatistics,
    RunningStatistics,
    frechet_distance,
    statistics_of,
)
from admkit.metrics.inception import (
    InceptionOutputs,
    InceptionV3FID,
    random_inception,
    spatial_features,
    tf1_resize_bilinear,
)
from admkit.metrics.inception_score import class_probabilities, inception_score
from admkit.metrics.inception_weights import find_inception_weights, load_inception
from admkit.metrics.precision_recall import manifold_radii, precision_recall, squared_distances

__all__ = [
    "ArrayImages",
    "EvaluationResult",
    "GaussianStatistics",
    "InceptionOutputs",
    "InceptionV3FID",
    "NpzImages",
    "RunningStatistics",
    "class_probabilities",
    "evaluate",
    "extract_features",
    "find_inception_weights",
    "frechet_distance",
    "inception_score",
    "load_inception",
    "manifold_radii",
    "precision_recall",
    "random_inception",
    "read_precomputed_statistics",
    "reference_statistics",
    "spatial_features",
    "squared_distances",
    "statistics_of",
    "tf1_resize_bilinear",
    "write_reference_batch",
]
