"""UNet forward and forward+backward throughput, admkit's path against the reference path.

Prints one JSON line per (implementation, dtype, mode): images/s (median of ``--repeats``) and
the speed-up over the reference path (float32, the original's attention, recomputed in the
backward pass), as the median of paired ratios: each timed call follows a reference call. A
small CPU configuration by default; ``--preset imagenet64`` (or any preset) for the released
networks on a GPU. ``--compile`` adds the forward pass compiled as ``admkit sample --compile``
does it.

    python benchmarks/bench_unet.py
    python benchmarks/bench_unet.py --preset imagenet256 --batch_size 8 --device cuda
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from admkit.allocator import keep_freed_memory  # noqa: E402
from admkit.compat import script_util  # noqa: E402
from admkit.generate import compiled_for_sampling  # noqa: E402
from admkit.presets import get_preset  # noqa: E402
from admkit.unet import UNet  # noqa: E402
from common import SMALL, autocast, device_name, emit, paired, reference_network  # noqa: E402


def build(args) -> tuple[torch.nn.Module, dict]:
    flags = script_util.model_and_diffusion_defaults()
    flags.update(get_preset(args.preset).flags if args.preset else SMALL)
    flags["use_fp16"] = False
    return UNet(script_util.model_config(flags)), flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="also time the forward pass compiled for sampling"
    )
    args = parser.parse_args()
    # Both paths under the allocator settings of `admkit`'s command line, so that the
    # ratios compare computation, not glibc's page faults (see benchmarks/README.md).
    keep_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, flags = build(args)
    model.to(device)
    size = flags["image_size"]
    x = torch.randn(args.batch_size, 3, size, size, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compiled = compiled_for_sampling(model.eval()) if args.compile else None

    def forward(network=model, dtype="fp32"):
        with torch.no_grad(), autocast(device, dtype):
            network(x, t, y=y)

    def forward_backward(dtype="fp32"):
        with autocast(device, dtype):
            out = model(x, t, y=y)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def reference_of(fn):
        def reference():
            with reference_network():
                fn()

        return reference

    rows = [("forward", "fp32", False), ("forward_backward", "fp32", False)]
    for dtype in args.dtypes.split(","):
        for mode in ("forward", "forward_backward"):
            rows.append((mode, dtype, True))
            if mode == "forward" and compiled is not None:
                rows.append((mode, dtype, "compiled"))
    for mode, dtype, own in rows:
        base = forward if mode == "forward" else forward_backward
        reference = reference_of(base)  # the original's way (common.reference_network), fp32
        if own == "compiled":
            fn = functools.partial(forward, compiled, dtype)
        else:
            fn = functools.partial(base, dtype=dtype) if own else reference
        seconds, speedup = paired(fn, reference, device, args.repeats)
        emit(
            dict(
                bench="unet",
                device=device_name(device),
                config=args.preset or "small-32px",
                batch_size=args.batch_size,
                impl="admkit" if own else "reference",
                dtype=dtype,
                mode=mode,
                compiled=own == "compiled",
                channels_last=args.channels_last,
                images_per_s=round(args.batch_size / seconds, 2),
                speedup=round(speedup, 3) if own else 1.0,
            )
        )


if __name__ == "__main__":
    main()
