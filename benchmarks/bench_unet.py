"""UNet forward and forward+backward throughput, admkit's path against the reference path.

Prints one JSON line per (implementation, dtype, mode). A small CPU configuration by default;
``--preset imagenet64`` (or any preset) for the released networks on a GPU.

    python benchmarks/bench_unet.py
    python benchmarks/bench_unet.py --preset imagenet256 --batch_size 8 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from admkit.compat import script_util  # noqa: E402
from admkit.presets import get_preset  # noqa: E402
from admkit.unet import UNet  # noqa: E402
from common import SMALL, autocast, device_name, emit, reference_attention, time_call  # noqa: E402


def build(args) -> tuple[torch.nn.Module, dict]:
    flags = script_util.model_and_diffusion_defaults()
    flags.update(get_preset(args.preset).flags if args.preset else SMALL)
    flags["use_fp16"] = False
    return UNet(script_util.model_config(flags)), flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels_last", action="store_true")
    args = parser.parse_args()
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
    config = args.preset or "small-32px"
    for dtype in args.dtypes.split(","):
        for impl in ("reference", "admkit"):
            if impl == "reference" and dtype != "fp32":
                continue  # the original has no autocast path to compare with

            def forward(dtype=dtype):
                with torch.no_grad(), autocast(device, dtype):
                    model(x, t, y=y)

            def forward_backward(dtype=dtype):
                with autocast(device, dtype):
                    out = model(x, t, y=y)
                out.float().square().mean().backward()
                model.zero_grad(set_to_none=True)

            for mode, fn in (("forward", forward), ("forward_backward", forward_backward)):
                if impl == "reference":
                    with reference_attention():
                        seconds = time_call(fn, device, args.repeats)
                else:
                    seconds = time_call(fn, device, args.repeats)
                emit(
                    dict(
                        bench="unet",
                        device=device_name(device),
                        config=config,
                        batch_size=args.batch_size,
                        impl=impl,
                        dtype=dtype,
                        mode=mode,
                        channels_last=args.channels_last,
                        images_per_s=round(args.batch_size / seconds, 2),
                    )
                )


if __name__ == "__main__":
    main()
