"""``admkit upsample``: run an upsampler over base samples (guided-diffusion's super_res_sample).

    admkit upsample --model 64_256_upsampler.pt --preset upsampler-64-256 \\
        --base_samples samples_64.npz --out samples_256.npz

The base samples are an ``.npz`` with ``arr_0`` uint8 ``[N, h, w, 3]`` at the upsampler's
``small_size`` (what ``admkit sample`` writes); their ``arr_1`` labels go to a class-conditional
upsampler. Image i draws its noise from the same generator stream as the upsampler stage of
``admkit sample --upsampler``, so sampling then upsampling with one seed gives the cascade's
images.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from admkit import distributed
from admkit.cli.models import LoadedModel, load_model
from admkit.cli.options import add_model_options, spellings
from admkit.cli.sampling import (
    UPSAMPLER_STREAM,
    build_stage,
    requested_labels,
    sample_and_write,
    sampling_chain,
)
from admkit.cli.sampling_options import (
    STEPS_HELP,
    add_sampling_options,
    check_sampling_options,
    choose_sampler,
    parse_interval,
    sampler_list,
)
from admkit.data import read_npz_images
from admkit.errors import UserError
from admkit.generate import check_outputs, draw_labels
from admkit.presets import get_preset


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Upsample base samples (.npz, arr_0 uint8 NHWC at the upsampler's\n"
        "small_size) with a super-resolution diffusion model; arr_1 labels are passed on.",
        epilog=f"samplers:\n{sampler_list()}\n\n{STEPS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sampling_options(parser)
    parser.add_argument(
        *spellings("base_samples"),
        required=True,
        metavar="BASE.npz",
        help="low-resolution images to upsample (arr_0 uint8 NHWC, optional arr_1 labels)",
    )
    add_model_options(parser, "upsampler")
    parser.set_defaults(run=run)
    return parser


def _labels(args, base_labels: np.ndarray | None, num_samples: int, upsampler: LoadedModel):
    num_classes = upsampler.num_classes
    requested = requested_labels(args, num_classes, upsampler.class_names)
    if num_classes is None:
        return None
    if requested:
        return draw_labels(num_samples, num_classes, args.seed, requested)
    if base_labels is None:
        raise UserError(
            f"the upsampler is class-conditional but {args.base_samples} has no arr_1 labels; "
            "pass --class_label K"
        )
    if base_labels.max() >= num_classes:
        raise UserError(
            f"{args.base_samples}: label {int(base_labels.max())} is out of range for an "
            f"upsampler of {num_classes} classes"
        )
    # Image i reads base image i mod M, as the original cycles over its file.
    return torch.from_numpy(base_labels[np.arange(num_samples) % len(base_labels)].astype(np.int64))


def run(args: argparse.Namespace) -> int:
    args.sampler = choose_sampler(args)
    check_sampling_options(args, args.sampler)
    parse_interval(args.guidance_interval)
    if args.guidance_interval and args.cfg_scale is None:
        raise UserError("--guidance_interval needs guidance: --cfg_scale")
    check_outputs([args.out, args.grid], args.overwrite, args.png_dir)
    images, base_labels = read_npz_images(args.base_samples)
    num_samples = args.num_samples or len(images)

    device = distributed.setup(distributed.select_device(args.device))
    try:
        upsampler = load_model(
            args.model, "upsampler", args, weights=args.weights, preset=args.preset
        )
        small = upsampler.flags["small_size"]
        if images.shape[1:3] != (small, small):
            raise UserError(
                f"{args.base_samples} holds {images.shape[1]}x{images.shape[2]} images, but the "
                f"upsampler takes {small}x{small}"
            )
        labels = _labels(args, base_labels, num_samples, upsampler)
        respacing = args.timestep_respacing
        if respacing is None and args.preset:
            respacing = get_preset(args.preset).timestep_respacing
        diffusion, base = sampling_chain(
            upsampler.flags, args.sampler, args.steps, args.step_spacing, respacing
        )
        stage = build_stage(
            upsampler,
            sampler=args.sampler,
            diffusion=diffusion,
            base=base,
            args=args,
            device=device,
            noise_stream=UPSAMPLER_STREAM,
            takes_low_res=True,
        )
        sample_and_write(
            args,
            [stage],
            weights={"upsampler": args.model},
            inputs={"base_samples": args.base_samples},
            what=f"upsampled with {args.sampler}",
            class_names=upsampler.class_names,
            num_samples=num_samples,
            labels=labels,
            low_res=images,
            device=device,
        )
    finally:
        distributed.teardown()
    return 0
