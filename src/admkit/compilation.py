"""The Inductor settings admkit compiles its networks with (``train --compile``,
``sample --compile``).

On a CPU, Inductor by default turns the network's convolutions channels-last ("layout
optimization"). The ADM network loses by it: its convolutions sit between GroupNorms and
SiLUs, whose channels-last kernels are slower on a CPU, and the layout copies cost more than the
convolutions gain. Measured on this project's 2-core CPU (the benchmarks' small 32-px model; a
compiled and an eager copy timed alternately in one process): a bf16 training step (batch 16)
ran 0.97× eager's speed compiled with the layout change and 1.06× without it; a bf16 forward
pass for sampling (batch 8, freezing) took 62.5 ms with it and 53.7 ms without, against 63.3 ms
eager. GPUs keep Inductor's default.
"""

from __future__ import annotations

import torch


def inductor_options(device: torch.device, *, freezing: bool = False) -> dict[str, bool]:
    """Options for ``torch.compile(network, options=...)`` on ``device``.

    Args:
        device: where the network runs.
        freezing: treat the weights as constants (sampling only: no gradients, no updates).
    """
    options = {"freezing": True} if freezing else {}
    if device.type == "cpu":
        options["layout_optimization"] = False
    return options
