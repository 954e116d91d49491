"""Inception Score as guided-diffusion's evaluator computes it (the improved-GAN recipe).

| symbol | code         | meaning                                                          |
| ------ | ------------ | ---------------------------------------------------------------- |
| x      |              | one sample image                                                 |
| p(y|x) | ``probs``    | softmax over 1008 classes of pool_3 · W (no bias)                |
| p(y)   | ``marginal`` | mean of p(y|x) over one split                                    |
| IS     | return value | mean over splits of exp(E_x KL(p(y|x) ‖ p(y)))                   |

W is the graph's ``softmax/weights`` (the checkpoint's ``fc.weight``); the evaluator never adds
``softmax/biases``.

Splits are consecutive runs of 5,000 samples in file order (50,000 samples give 10 splits; a
remainder is a shorter last split), never shuffled. The logs are plain float32 ``log`` of the
probabilities with no epsilon, as the original: a probability of exactly 0 gives NaN.
"""

from __future__ import annotations

import numpy as np
import torch

SPLIT_SIZE = 5000
SOFTMAX_BATCH_SIZE = 512


def class_probabilities(
    pool_3: np.ndarray, fc_weight: torch.Tensor, batch_size: int = SOFTMAX_BATCH_SIZE
) -> np.ndarray:
    """p(y|x) [N, 1008] float32 from pool_3 features [N, 2048] and the weight [1008, 2048].

    Runs on ``fc_weight``'s device in batches of 512, as the evaluator's softmax graph does.
    """
    weight = fc_weight.detach().to(torch.float32)
    chunks = []
    for start in range(0, len(pool_3), batch_size):
        features = torch.as_tensor(pool_3[start : start + batch_size], device=weight.device)
        logits = features.to(torch.float32) @ weight.t()
        chunks.append(torch.softmax(logits, dim=1).cpu().numpy())
    if not chunks:
        return np.zeros((0, weight.shape[0]), dtype=np.float32)
    return np.concatenate(chunks)


def inception_score(probs: np.ndarray, split_size: int = SPLIT_SIZE) -> float:
    """IS of class probabilities p(y|x) [N, K]: the mean over consecutive splits, no std."""
    if len(probs) == 0:
        raise ValueError("the Inception Score needs at least one sample")
    scores = []
    for start in range(0, len(probs), split_size):
        p = probs[start : start + split_size]
        marginal = p.mean(axis=0, keepdims=True)  # p(y)
        kl = (p * (np.log(p) - np.log(marginal))).sum(axis=1).mean()  # E_x KL(p(y|x) ‖ p(y))
        scores.append(np.exp(kl))
    return float(np.mean(scores))
