"""Read the conformance vectors in ``tests/conformance/`` (made by running the original code).

Each ``.pt`` file is a plain dict of tensors and strings. Model weights are not stored; they are
regenerated from the stored parameter names and shapes with a seeded numpy generator, following
the recipe documented beside the vectors:

* tensors with two or more dims: N(0, 1) scaled by 0.5 / sqrt(fan_in), fan_in = prod(shape[1:]);
* one-dim tensors whose name ends in ``weight``: 1 + 0.1 N(0, 1);
* every other one-dim tensor: 0.1 N(0, 1);

drawn in float64, in the order of the stored names, then stored as float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

CONFORMANCE_DIR = Path(__file__).parent / "conformance"


def regenerate_weights(names: list[str], shapes, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(int(seed))
    weights = {}
    for name, shape in zip(names, shapes):
        shape = tuple(int(s) for s in shape)
        draw = rng.standard_normal(shape).astype(np.float64)
        if len(shape) >= 2:
            fan_in = max(1, math.prod(shape[1:]))
            draw = draw * (0.5 / math.sqrt(fan_in))
        elif name.endswith("weight"):
            draw = 1.0 + 0.1 * draw
        else:
            draw = 0.1 * draw
        weights[name] = torch.from_numpy(draw.astype(np.float32))
    return weights


def load_case(name: str) -> dict:
    """Load ``tests/conformance/<name>`` with ``flags`` parsed and ``state_dict`` rebuilt."""
    case = torch.load(CONFORMANCE_DIR / name, weights_only=True)
    if "flags" in case:
        case["flags"] = json.loads(case["flags"])
    if "param_names" in case:
        names = case["param_names"].split("\n")
        case["state_dict"] = regenerate_weights(names, case["param_shapes"], case["seed"])
    return case
