"""An independent judge for the built-in digits: a small CNN trained on real digits only.

The demo and the quality benchmark ask it two things about generated digits: which digit it is
(judged accuracy = share of samples classified as the requested digit) and a feature vector (the
penultimate layer) in which Fréchet distance and precision/recall against held-out real digits are
measured — the digits' stand-in for Inception features. It shares no code or weights with the
diffusion model or the noise-aware classifier, so it cannot be fooled by their shared mistakes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

JUDGE_SIZE = 16  # every input is resized to this many pixels a side
NUM_FEATURES = 128


class DigitJudge(nn.Module):
    """Grey 16×16 input → 128 features → 10 logits. Accepts ``[N, 3, S, S]`` in [−1, 1]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, NUM_FEATURES),
            nn.ReLU(),
        )
        self.head = nn.Linear(NUM_FEATURES, num_classes)

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """``[N, C, S, S]`` in [−1, 1] → grey ``[N, 1, 16, 16]``."""
        grey = x.float().mean(dim=1, keepdim=True)
        if grey.shape[-1] != JUDGE_SIZE:
            grey = F.interpolate(
                grey, size=(JUDGE_SIZE, JUDGE_SIZE), mode="bilinear", antialias=True
            )
        return grey

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[N, 128]``."""
        return self.body(self.prepare(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Random translations of up to one pixel (at 16 px), so the judge does not depend on exact
    # placement, which generated digits need not share with the data.
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def train_judge(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> DigitJudge:
    """Train a judge on real ``images`` ``[N, C, S, S]`` in [−1, 1] with digit ``labels`` [N]."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = DigitJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    x_all = DigitJudge.prepare(images)
    for _ in range(steps):
        index = torch.randint(0, len(x_all), (batch_size,), generator=generator)
        x = _shift(x_all[index], generator)
        x = x + 0.05 * torch.randn(x.shape, generator=generator)
        loss = F.cross_entropy(judge.head(judge.body(x)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge: DigitJudge, x: torch.Tensor, batch_size: int = 512):
    """``(features [N, 128] float64 numpy, predicted digit [N] int64 numpy)`` for images x."""
    features, predictions = [], []
    for start in range(0, len(x), batch_size):
        f = judge.features(x[start : start + batch_size])
        features.append(f)
        predictions.append(judge.head(f).argmax(dim=1))
    return torch.cat(features).double().numpy(), torch.cat(predictions).numpy()
