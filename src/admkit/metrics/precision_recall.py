"""Improved precision and recall (Kynkäänniemi et al., 2019) as guided-diffusion's evaluator.

| symbol    | code                  | meaning                                                  |
| --------- | --------------------- | -------------------------------------------------------- |
| Φ_r, Φ_g  | ``reference, sample`` | pool_3 features of reference [N_r, D] and samples [N_g, D] |
| d(u, v)   | ``squared_distances`` | squared Euclidean distance ‖u − v‖²                      |
| r(φ)      | ``manifold_radii``    | d from φ to its k-th nearest neighbour in its own set    |
|           |                       | (k = 3, φ itself not counted)                            |
| precision |                       | share of φ_g with d(φ_g, φ_r) ≤ r(φ_r) for some φ_r      |
| recall    |                       | share of φ_r with d(φ_r, φ_g) ≤ r(φ_g) for some φ_g      |

Details that move the numbers and are kept on purpose: distances are *squared*; every block of
distances is computed in float16 first and recomputed in float32 only when some entry is not
finite (as the original's ``tf.cond``); blocks are 10,000 × 10,000; the comparison is ≤; all
reference images are compared with all samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

NEIGHBOURHOOD_SIZE = 3
BATCH_SIZE = 10_000


def _squared_distances_in(u: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
    u, v = u.to(dtype), v.to(dtype)
    norm_u = (u * u).sum(dim=1, keepdim=True)
    norm_v = (v * v).sum(dim=1).unsqueeze(0)
    return (norm_u - 2 * (u @ v.t()) + norm_v).clamp_min(0)


def squared_distances(u: Tensor, v: Tensor) -> Tensor:
    """d(u_i, v_j) for features u [B1, D] and v [B2, D], as a float32 [B1, B2] block.

    float16 first; if any entry overflows or is NaN (features with ‖x‖² > 65504 do), the whole
    block is recomputed in float32.
    """
    distances = _squared_distances_in(u, v, torch.float16)
    if bool(torch.isfinite(distances).all()):
        return distances.to(torch.float32)
    return _squared_distances_in(u, v, torch.float32)


def manifold_radii(
    features: Tensor, k: int = NEIGHBOURHOOD_SIZE, batch_size: int = BATCH_SIZE
) -> Tensor:
    """r(φ) [N] for features [N, D]: the (k + 1)-th smallest d(φ, ·) over the set, φ included.

    The evaluator partitions full rows of distances; keeping the k + 1 smallest of each
    column block and taking the (k + 1)-th of those gives the same value with less memory.
    """
    if len(features) <= k:
        raise ValueError(f"the {k}-nearest-neighbour radius needs more than {k} points")
    radii = torch.empty(len(features), dtype=torch.float32, device=features.device)
    for row in range(0, len(features), batch_size):
        rows = features[row : row + batch_size]
        nearest = []
        for col in range(0, len(features), batch_size):
            distances = squared_distances(rows, features[col : col + batch_size])
            keep = min(k + 1, distances.shape[1])
            nearest.append(distances.topk(keep, dim=1, largest=False).values)
        radii[row : row + batch_size] = torch.cat(nearest, dim=1).kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(
    reference: Tensor | np.ndarray,
    sample: Tensor | np.ndarray,
    k: int = NEIGHBOURHOOD_SIZE,
    batch_size: int = BATCH_SIZE,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """(precision, recall) of sample features [N_g, D] against reference features [N_r, D]."""
    reference = torch.as_tensor(reference, device=device).to(torch.float32)
    sample = torch.as_tensor(sample, device=device).to(torch.float32)
    reference_radii = manifold_radii(reference, k, batch_size)
    sample_radii = manifold_radii(sample, k, batch_size)
    reference_in = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=sample.device)
    for row in range(0, len(reference), batch_size):
        for col in range(0, len(sample), batch_size):
            distances = squared_distances(
                reference[row : row + batch_size], sample[col : col + batch_size]
            )
            within_sample = distances <= sample_radii[col : col + batch_size].unsqueeze(0)
            within_reference = distances <= reference_radii[row : row + batch_size].unsqueeze(1)
            reference_in[row : row + batch_size] |= within_sample.any(dim=1)
            sample_in[col : col + batch_size] |= within_reference.any(dim=0)
    precision = sample_in.to(torch.float64).mean().item()
    recall = reference_in.to(torch.float64).mean().item()
    return precision, recall
