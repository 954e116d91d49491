"""``admkit train --data DATA --out RUN [model options] [training options]``: a diffusion model.

guided-diffusion's ``image_train.py`` as one command (SPEC §2.2): the model and diffusion flags
keep their names, ``--batch_size`` is global, and rerunning the same command resumes the run.
"""

from __future__ import annotations

import argparse

import torch

from admkit.cli import training, training_monitor
from admkit.cli.models import build_diffusion, build_network
from admkit.cli.options import add_model_options, preset_flags, resolve_flags

DESCRIPTION = (
    "Train a diffusion model (the ADM UNet) on an image folder, an .npz or the built-in digits. "
    "Running the same command again resumes from the newest checkpoint; --steps may grow."
)
EPILOG = (
    "Mixed precision: --use_fp16 True (guided-diffusion's flag) means --precision fp16 here, "
    "autocast with loss scaling in place of the original's hand-made fp16 training; "
    "--precision, when given, wins. Example: admkit train --data digits --out runs/digits "
    "--image_size 8 --num_channels 32 --num_res_blocks 1 --class_cond True --steps 2000 "
    "--sample_every 500 (a grid in runs/digits/samples/ and the digits judge's figures in "
    "log.jsonl and metrics.png every 500 steps)"
)


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=DESCRIPTION, epilog=EPILOG)
    training.add_run_options(parser)
    add_model_options(parser, "model")
    training.add_training_options(parser, "diffusion")
    training.add_diffusion_loss_options(parser)
    training_monitor.add_monitor_options(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    training.check_out(args.out)
    base = preset_flags(args.preset, "diffusion") if args.preset else None
    flags = resolve_flags(args, "model", base)
    config = training.train_config(args, use_fp16=flags["use_fp16"])
    training_monitor.check_monitor_options(args, flags, config)
    dataset = training.open_training_data(args.data, flags["image_size"], args.random_flip, "train")
    num_classes, null_label = training.conditioning(flags, dataset, args.cfg_dropout)

    torch.manual_seed(args.seed)  # the same initial weights for the same command
    network = build_network("diffusion", flags)
    diffusion = build_diffusion(flags)
    loss_fn, objective = training.diffusion_objective(args, flags, diffusion, null_label)
    config_json = training.run_config(
        "diffusion",
        flags,
        dataset,
        args.data,
        num_classes=num_classes,
        cfg_null_label=null_label,
        objective=objective,
    )
    monitor = training_monitor.build_monitor(
        args, "diffusion", flags, config, network, dataset, num_classes
    )
    return training.fit(
        args, "train", network, loss_fn, dataset, config, config_json, after_step=monitor
    )
