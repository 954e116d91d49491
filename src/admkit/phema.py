"""Post-hoc EMA (EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", §3 and Appendix C): power-function EMAs tracked during training, and any other
EMA length reconstructed after training from their stored snapshots.

Notation (t counts optimizer steps done; EDM2 counts images, the same thing at a fixed batch):

    θ_k          the parameters after step k (θ_0 the initial ones)
    γ            exponent of a power-function profile, γ > 0               ``gamma``
    σ_rel        the profile's standard deviation over its length          ``sigma_rel``
    θ̂_t          the power-function EMA after t steps                      ``average``
    β_t          its decay at step t                                       ``beta``
    p_{t,γ}(τ)   its weight density over training time τ in [0, t]
    w_k          the weight of θ_k in θ̂_t                                  ``step_weights``
    (t_i, γ_i)   the profiles of the stored snapshots θ̂_i
    A, b, c      inner products <p_i, p_j>, <p_i, p_r>, <p_r, p_r>         ``gram``
    x            reconstruction coefficients: θ̂_r ≈ Σ_i x_i θ̂_i            ``coefficients``

    p_{t,γ}(τ) = (γ+1) τ^γ / t^(γ+1)                       (0 <= τ <= t, zero after)
    σ_rel² = (γ+1) / ((γ+2)² (γ+3))                        (Eq. 123)
    θ̂_t = β_t θ̂_{t-1} + (1 - β_t) θ_t,  β_t = (1 - 1/t)^(γ+1)      (Eq. 127; β_1 = 0)
    w_k = (k^(γ+1) - (k-1)^(γ+1)) / t^(γ+1) = ∫_{k-1}^{k} p_{t,γ}(τ) dτ,  k = 1..t

The last line makes the continuous least-squares reconstruction exact for parameters that are
piecewise constant per step (θ(τ) = θ_k on (k-1, k], which is what training produces):
θ̂_t = ∫ p_{t,γ} θ dτ, so any combination Σ x_i θ̂_i = ∫ (Σ x_i p_i) θ dτ, and its distance to the
target θ̂_r = ∫ p_r θ dτ is, per parameter and for any constant c when Σ x_i = 1,

    |Σ x_i θ̂_i - θ̂_r| = |∫ (Σ x_i p_i - p_r)(θ - c) dτ| <= ||Σ x_i p_i - p_r|| · ||θ - c||

(Cauchy-Schwarz; the norms are L2 over [0, t_r]). Unlike EDM2, which solves A x = b and then
rescales x to sum to 1, the coefficients here are the least-squares solution among those that sum
to 1 (constant weights are reproduced exactly, and the residual is never larger than EDM2's).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# The "format" a snapshot file names in its metadata.
SNAPSHOT_FORMAT = "admkit-phema-snapshot"
# σ_rel at γ = 0. Above it the power-function profile would put more weight on early steps than
# on recent ones (γ < 0), and σ_rel(γ) stops being one-to-one, so it bounds what can be tracked.
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)
# Eigenvalues of the (constrained) Gram matrix below this fraction of the largest are dropped:
# its entries carry float64 rounding of ~1e-16 relative, so directions below ~1e-13 are noise;
# 1e-12 keeps every direction the data resolves (two profiles snapshotted every 1000 of 200k
# steps, 400 in all, give a condition number of about 2e8).
RCOND = 1e-12


def sigma_rel_from_gamma(gamma: float) -> float:
    """σ_rel of the power-function profile with exponent γ (Eq. 123)."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ > 0 whose profile has relative width ``sigma_rel`` in (0, 1/√12).

    σ_rel(γ) decreases strictly on γ >= 0 (d ln σ_rel² / dγ = -γ/((γ+1)(γ+2)) - 1/(γ+3) < 0), so
    bisection on a bracket finds the one root to float64 precision; σ_rel ≈ 1/γ for large γ.
    """
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel {sigma_rel} must lie in (0, {MAX_SIGMA_REL:.4f})")
    low, high = 0.0, 2.0 / sigma_rel
    while sigma_rel_from_gamma(high) > sigma_rel:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if sigma_rel_from_gamma(middle) > sigma_rel:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def power_ema_beta(t: int, gamma: float) -> float:
    """β_t = (1 - 1/t)^(γ+1), the decay of the update that makes step t's average (Eq. 127)."""
    if t < 1:
        raise ValueError(f"step count t {t} must be at least 1")
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def step_weights(t: int, gamma: float, num_steps: int | None = None) -> np.ndarray:
    """w_k for k = 1..``num_steps`` (default t) of the average after t steps, float64 ``[K]``;
    zero for k > t. Computed as ((k/t)^(γ+1) - ((k-1)/t)^(γ+1)), which cannot overflow."""
    k = np.arange(1, (t if num_steps is None else num_steps) + 1, dtype=np.float64)
    upper = np.minimum(k, t) / t
    lower = np.minimum(k - 1.0, t) / t
    return upper ** (gamma + 1.0) - lower ** (gamma + 1.0)


def gram(
    t_a: np.ndarray | float,
    gamma_a: np.ndarray | float,
    t_b: np.ndarray | float,
    gamma_b: np.ndarray | float,
) -> np.ndarray:
    """<p_{t_a,γ_a}, p_{t_b,γ_b}> = ∫_0^{min(t_a, t_b)} p_a p_b dτ, broadcast (Eq. 151).

    With m = min(t_a, t_b), M = max(t_a, t_b) and γ_M the exponent of the longer profile:
    (γ_a+1)(γ_b+1) / ((γ_a+γ_b+1) m) · (m/M)^(γ_M+1).
    """
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    )
    shorter, longer = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    gamma_longer = np.where(t_a <= t_b, gamma_b, gamma_a)
    scale = (gamma_a + 1.0) * (gamma_b + 1.0) / ((gamma_a + gamma_b + 1.0) * shorter)
    return scale * (shorter / longer) ** (gamma_longer + 1.0)


@dataclass(frozen=True)
class Reconstruction:
    """How to make the target profile (``t``, ``gamma``) from the snapshot profiles.

    ``coefficients`` ``[n]`` (x, summing to 1) go with the snapshots' ``(t_i, γ_i)`` in the order
    given; ``residual`` is ||Σ x_i p_i - p_r|| / ||p_r||; ``gain`` is Σ |x_i|, the factor by which
    rounding in the stored snapshots can grow in the result.
    """

    t: int
    gamma: float
    coefficients: np.ndarray
    residual: float
    gain: float


class Solver:
    """Least-squares reconstruction from a fixed set of snapshot profiles (Alg. 3).

    Minimises ||Σ x_i p_i - p_r|| subject to Σ x_i = 1: with x = x_0 + N z, x_0 = 1/n and N an
    orthonormal basis of the vectors summing to zero, z solves (Nᵀ A N) z = Nᵀ (b - A x_0), by
    eigendecomposition with eigenvalues below ``RCOND`` of the largest dropped. The
    decomposition is done once, so many targets cost a matrix-vector product each.
    """

    def __init__(self, t: Sequence[int], gammas: Sequence[float]) -> None:
        if len(t) != len(gammas) or not len(t):
            raise ValueError("give one γ per snapshot profile, and at least one profile")
        self.t = np.asarray(t, dtype=np.float64)
        self.gammas = np.asarray(gammas, dtype=np.float64)
        n = len(self.t)
        self.gram = gram(self.t[:, None], self.gammas[:, None], self.t[None], self.gammas[None])
        self.x0 = np.full(n, 1.0 / n)
        # The right singular vectors of a row of ones beyond the first span {y : Σ y = 0}.
        self.null = np.linalg.svd(np.ones((1, n)))[2][1:].T
        eigenvalues, vectors = np.linalg.eigh(self.null.T @ self.gram @ self.null)
        kept = eigenvalues > RCOND * max(eigenvalues.max(initial=0.0), 0.0)
        self.eigenvalues, self.vectors = eigenvalues[kept], vectors[:, kept]

    def solve(self, t: int, gamma: float) -> Reconstruction:
        """The coefficients for the target profile (t, γ), with the residual of the fit."""
        b = gram(self.t, self.gammas, float(t), gamma)
        c = float(gram(float(t), gamma, float(t), gamma))
        g = self.null.T @ (b - self.gram @ self.x0)
        z = self.vectors @ ((self.vectors.T @ g) / self.eigenvalues)
        x = self.x0 + self.null @ z
        # ||Σ x_i p_i - p_r||² = xᵀAx - 2bᵀx + c; cancellation leaves ~1e-16 c, so the relative
        # residual reads 0 up to ~1e-8 (a reconstruction that is exact shows as about that).
        squared = float(x @ self.gram @ x - 2.0 * b @ x + c)
        residual = math.sqrt(max(squared, 0.0) / c)
        return Reconstruction(int(t), float(gamma), x, residual, float(np.abs(x).sum()))


def reconstructed_step_weights(
    t: Sequence[int], gammas: Sequence[float], coefficients: np.ndarray, num_steps: int
) -> np.ndarray:
    """Σ_i x_i w_k(t_i, γ_i) for k = 1..``num_steps``: the weight each step's parameters get in
    a reconstruction, float64 ``[num_steps]`` (compare ``step_weights(t_r, γ_r)``)."""
    total = np.zeros(num_steps, dtype=np.float64)
    for t_i, gamma_i, x_i in zip(t, gammas, coefficients):
        total += x_i * step_weights(int(t_i), float(gamma_i), num_steps)
    return total


class ParameterAverages:
    """Moving averages of a model's parameters, one per key, kept in float32 (the classic EMAs of
    ``admkit.train`` and the power-function ones here); subclasses say how they decay."""

    def __init__(self, model: torch.nn.Module, keys: Sequence[Any]) -> None:
        self.names = [name for name, _ in model.named_parameters()]
        self.averages = {
            key: [p.detach().float().clone() for p in model.parameters()] for key in keys
        }

    @torch.no_grad()
    def _move_towards(self, model: torch.nn.Module, weights: Mapping[Any, float]) -> None:
        """average <- average + weight·(θ - average) for every key: one fused pass each."""
        params = [p.detach().float() for p in model.parameters()]
        for key, average in self.averages.items():
            torch._foreach_lerp_(average, params, weights[key])

    def state_dict(self, model: torch.nn.Module, key: Any) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the parameters replaced by the average ``key``."""
        state = dict(model.state_dict())
        state.update(zip(self.names, self.averages[key]))
        return state

    @torch.no_grad()
    def load_state_dict(self, key: Any, state: Mapping[str, torch.Tensor]) -> None:
        for average, name in zip(self.averages[key], self.names):
            average.copy_(state[name])


class PowerFunctionEMA(ParameterAverages):
    """Power-function EMAs of a model's parameters, one per σ_rel label, in float32.

    ``sigma_rels`` are labels that parse as numbers ("0.05", "0.10": they name the weights).
    ``update(model, t)`` makes the averages after t steps; at t = 1 (β_1 = 0) each becomes θ_1,
    so the initial parameters get no weight.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[str]) -> None:
        super().__init__(model, sigma_rels)
        self.gammas = {label: gamma_from_sigma_rel(float(label)) for label in sigma_rels}

    def update(self, model: torch.nn.Module, t: int) -> None:
        """θ̂ <- β_t θ̂ + (1 - β_t) θ for every profile, θ the parameters after step t."""
        weights = {label: 1.0 - power_ema_beta(t, gamma) for label, gamma in self.gammas.items()}
        self._move_towards(model, weights)

    def metadata(self, step: int) -> dict[str, str]:
        """What a snapshot file records besides its tensors (safetensors metadata: strings)."""
        return {
            "format": SNAPSHOT_FORMAT,
            "step": str(step),
            "sigma_rel": json.dumps(list(self.gammas)),
            "gamma": json.dumps(list(self.gammas.values())),
        }

    def snapshot(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every average's parameters as ``"LABEL/NAME"`` -> tensor in ``dtype``, on the CPU."""
        return {
            f"{label}/{name}": value.detach().to("cpu", dtype).contiguous()
            for label, average in self.averages.items()
            for name, value in zip(self.names, average)
        }
