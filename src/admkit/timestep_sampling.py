"""Which timesteps a training batch uses: uniform, or importance-sampled by loss (IDDPM §3.3).

A sampler draws chain indices t ``[N]`` with probabilities p_t and returns the importance
weights 1/(T p_t) ``[N]``, so that the weighted mean loss is an unbiased estimate of the uniform
mean. ``LossSecondMomentResampler`` learns p_t ∝ √E[L_t²] from the losses it is shown
(IDDPM Eq. 18), mixed with a little of the uniform distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from admkit import noise
from admkit.errors import UserError


class ScheduleSampler:
    """Base class: subclasses give ``weights()``, the unnormalised p_t, float64 ``[T]``."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        raise NotImplementedError

    def sample(
        self,
        batch_size: int,
        device: torch.device | str,
        rng: np.random.Generator | torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Chain indices t (int64 ``[N]``) and importance weights 1/(T p_t) (float32 ``[N]``).

        Draws from ``rng``: one ``torch.Generator`` per example (``admkit.train`` seeds each by
        (seed, step, example index), so t does not depend on how the batch is split), a single
        ``torch.Generator``, a NumPy generator, or, when None, NumPy's global generator as
        guided-diffusion does. Per example, t is the inverse CDF of p at one uniform number.
        """
        w = self.weights()
        p = w / np.sum(w)
        if isinstance(rng, (list, tuple)):
            u = noise.rand(batch_size, generator=rng, device=device, dtype=torch.float64)
            cdf = torch.from_numpy(np.cumsum(p)).to(u.device)
            indices = torch.searchsorted(cdf, u, right=True).clamp(max=len(p) - 1)
            weights = 1 / (len(p) * torch.from_numpy(p).to(u.device)[indices])
            return indices, weights.float()
        if isinstance(rng, torch.Generator):
            p_t = torch.from_numpy(p).to(rng.device)
            indices = torch.multinomial(p_t, batch_size, replacement=True, generator=rng)
            weights = 1 / (len(p) * p_t[indices])
            return indices.to(device), weights.float().to(device)
        choice = np.random.choice if rng is None else rng.choice
        indices = choice(len(p), size=(batch_size,), p=p)
        weights = 1 / (len(p) * p[indices])
        return (
            torch.from_numpy(np.asarray(indices)).long().to(device),
            torch.from_numpy(weights).float().to(device),
        )


class UniformSampler(ScheduleSampler):
    def weights(self) -> np.ndarray:
        return np.ones([self.num_timesteps], dtype=np.float64)


class LossAwareSampler(ScheduleSampler):
    """A sampler that learns from training losses; subclasses give ``update_with_all_losses``."""

    def update_with_local_losses(self, local_ts: Tensor, local_losses: Tensor) -> None:
        """Record this rank's (t, loss) pairs, gathered across ranks when torch.distributed runs.

        Every rank then holds the same history, so every rank draws from the same p_t.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        device = local_ts.device
        sizes = [
            torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())
        ]
        dist.all_gather(sizes, torch.tensor([len(local_ts)], dtype=torch.int64, device=device))
        sizes = [int(size.item()) for size in sizes]
        gathered = {}
        for name, local in (("ts", local_ts), ("losses", local_losses)):
            # all_gather needs equal shapes: pad every rank's batch to the longest one.
            padded = torch.zeros(max(sizes), dtype=local.dtype, device=device)
            padded[: len(local)] = local
            parts = [torch.zeros_like(padded) for _ in sizes]
            dist.all_gather(parts, padded)
            gathered[name] = [x for part, n in zip(parts, sizes) for x in part[:n].tolist()]
        ts, losses = [int(t) for t in gathered["ts"]], [float(x) for x in gathered["losses"]]
        self.update_with_all_losses(ts, losses)

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        raise NotImplementedError


class LossSecondMomentResampler(LossAwareSampler):
    """p_t ∝ √(mean of the last ``history_per_term`` L_t²), uniform until every t has them."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([self.num_timesteps, history_per_term], dtype=np.float64)
        # Plain int64: guided-diffusion's np.int no longer exists in NumPy >= 1.24.
        self._loss_counts = np.zeros([self.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Keep the most recent losses: drop the oldest, append the new one.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The loss history and counts, as tensors (checkpointed with a training run)."""
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        history = state["loss_history"].cpu().numpy().astype(np.float64)
        counts = state["loss_counts"].cpu().numpy().astype(np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise ValueError(
                f"sampler state of shape {history.shape} does not fit "
                f"{self._loss_history.shape} (another number of timesteps or history length)"
            )
        self._loss_history[...] = history
        self._loss_counts[...] = counts

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())


SCHEDULE_SAMPLERS = {"uniform": UniformSampler, "loss-second-moment": LossSecondMomentResampler}


def schedule_sampler(name: str, num_timesteps: int) -> ScheduleSampler:
    """The sampler called ``name`` ('uniform' or 'loss-second-moment') for a T-step chain."""
    if name not in SCHEDULE_SAMPLERS:
        raise UserError(
            f"unknown schedule sampler: {name!r}; use one of {', '.join(SCHEDULE_SAMPLERS)}"
        )
    return SCHEDULE_SAMPLERS[name](num_timesteps)
