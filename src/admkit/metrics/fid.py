"""Fréchet distance between Gaussians fitted to Inception features: FID (pool_3) and sFID.

| symbol          | code            | meaning                                                   |
| --------------- | --------------- | --------------------------------------------------------- |
| μ₁, Σ₁          | ``sample``      | mean [D] and covariance [D, D] of the sample features     |
| μ₂, Σ₂          | ``reference``   | the same for the reference batch (or its precomputed set) |
| d²              | return value    | ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½                |

As guided-diffusion's evaluator (after TTUR): Σ is ``np.cov`` (unbiased, N − 1) in float64,
(Σ₁Σ₂)^½ is ``scipy.linalg.sqrtm``; a non-finite root is retried with 1e-6 added to both
diagonals, and a complex root is accepted only if its diagonal's imaginary parts are within 1e-3
of zero. D is 2048 for FID and 2023 for sFID.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch


@dataclass(frozen=True)
class GaussianStatistics:
    """Mean ``mu`` [D] and covariance ``sigma`` [D, D] of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray

    def __post_init__(self):
        d = self.mu.shape[0]
        if self.mu.shape != (d,) or self.sigma.shape != (d, d):
            raise ValueError(f"mu {self.mu.shape} and sigma {self.sigma.shape} do not fit")


def statistics_of(features: np.ndarray) -> GaussianStatistics:
    """μ and Σ (unbiased) of features [N, D], computed in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return GaussianStatistics(features.mean(axis=0), np.cov(features, rowvar=False))


class RunningStatistics:
    """μ and Σ of a stream of feature batches without keeping the features.

    Each batch's mean and centred scatter matrix are merged into the running ones with the
    pairwise update of Chan, Golub & LeVeque (1979), in float64 on ``device`` (the GPU that
    made the features, so 50,000 × 2023 sFID features never leave it); the result equals
    ``np.cov`` of all rows to rounding, and ranks can merge partial results in any order.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        # Σᵢ (xᵢ − μ)(xᵢ − μ)ᵀ
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of features [B, D]."""
        features = torch.as_tensor(features, device=self.mean.device).to(torch.float64)
        if len(features) == 0:
            return
        batch = RunningStatistics(features.shape[1], device=self.mean.device)
        batch.count = len(features)
        batch.mean = features.mean(dim=0)
        centred = features - batch.mean
        batch.scatter = centred.t() @ centred
        self.merge(batch)

    def merge(self, other: RunningStatistics) -> None:
        """Fold in another accumulator's rows."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean.to(self.mean.device) - self.mean
        self.scatter += other.scatter.to(self.mean.device)
        self.scatter += torch.outer(delta, delta) * (self.count * other.count / total)
        self.mean += delta * (other.count / total)
        self.count = total

    def to(self, device: str | torch.device) -> RunningStatistics:
        """A copy on ``device`` (e.g. the CPU before gathering across ranks)."""
        moved = RunningStatistics(len(self.mean), device=device)
        moved.count, moved.mean, moved.scatter = (
            self.count,
            self.mean.to(device),
            self.scatter.to(device),
        )
        return moved

    def statistics(self) -> GaussianStatistics:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.count}")
        sigma = self.scatter / (self.count - 1)
        return GaussianStatistics(self.mean.cpu().numpy(), sigma.cpu().numpy())


def frechet_distance(
    sample: GaussianStatistics, reference: GaussianStatistics, eps: float = 1e-6
) -> float:
    """d² between N(μ₁, Σ₁) (samples) and N(μ₂, Σ₂) (reference), as the evaluator computes it."""
    mu1, sigma1 = sample.mu, sample.sigma
    mu2, sigma2 = reference.mu, reference.sigma
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sizes differ: samples {mu1.shape}, reference {mu2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"(Σ₁Σ₂)^½ is not finite; retrying with {eps} added to both diagonals", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(f"(Σ₁Σ₂)^½ is complex: imaginary parts up to {largest:.3g} (> 1e-3)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
