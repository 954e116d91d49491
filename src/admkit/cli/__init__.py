"""The ``admkit`` command: one sub-command per module in this package.

Each command module defines ``add_parser(subparsers)`` (registers its options) and
``run(args) -> int``. Modules are imported only when their command runs, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from admkit.allocator import keep_freed_memory
from admkit.errors import UserError

# command name -> (module under admkit.cli, one-line help)
COMMANDS = {
    "train": ("train", "train a diffusion model"),
    "train-classifier": ("train_classifier", "train a noise-aware classifier"),
    "train-upsampler": ("train_upsampler", "train a super-resolution diffusion model"),
    "sample": ("sample", "draw samples from a model (optionally guided, optionally cascaded)"),
    "upsample": ("upsample", "run an upsampler over base samples"),
    "nll": ("nll", "negative log-likelihood bound in bits/dim (image_nll.py)"),
    "sweep": ("sweep", "sample and score a grid of sampling settings; tables and plots"),
    "evaluate": ("evaluate", "Inception Score, FID, sFID, precision and recall"),
    "ref-batch": ("ref_batch", "make a reference batch for evaluate"),
    "presets": ("presets", "list the released configurations, or print one"),
    "ema": ("ema", "post-hoc EMA: make EMA profiles of any length from a run's --phema snapshots"),
    "demo": ("demo", "train, guide and evaluate on the built-in digits"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(f"admkit.cli.{module_name}")
    except ModuleNotFoundError as error:
        if error.name == f"admkit.cli.{module_name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="admkit", description="Guided diffusion: train, guide, upsample and evaluate."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            sub = subparsers.add_parser(name, help=f"{help_text} (not available yet)")
            sub.set_defaults(_unavailable=name)
        else:
            module.add_parser(subparsers, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for reports
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"admkit {args.command}: not implemented yet in this version of admkit.")
        return 3
    try:
        code = args.run(args)
    except UserError as error:
        print(f"admkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"admkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def entry_point() -> None:
    keep_freed_memory()  # a CPU forward pass stops page-faulting its activations
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        sys.exit(main())
    # Launched by torchrun: leave without the interpreter's finalization (see exit_process).
    from admkit.distributed import exit_process  # here, so that --help does not import torch

    try:
        code = main()
    except SystemExit as error:  # argparse's --help and usage errors
        code = error.code or 0
        if not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_process(code)
