"""``admkit sample``: draw images from a model, optionally guided, optionally cascaded.

    admkit sample --model RUN --out samples.npz --num_samples 64 --sampler dpm++2m --steps 20
    admkit sample --model 64x64_diffusion.pt --preset imagenet64 \\
        --classifier 64x64_classifier.pt --out samples.npz

The model, classifier and upsampler are each a run directory, a ``.safetensors`` file with its
``config.json``, or a released ``.pt`` with ``--preset`` (its classifier preset, guidance scale
and respacing come with it) or the model options. The sampling options are shared with
``admkit upsample`` (``admkit.cli.sampling``).
"""

from __future__ import annotations

import argparse

from admkit import distributed
from admkit.checkpoint import config_dir
from admkit.cli.models import load_model
from admkit.cli.options import add_model_options, spellings
from admkit.cli.sampling import (
    UPSAMPLER_STREAM,
    base_stage,
    build_stage,
    common_num_classes,
    load_base_models,
    requested_labels,
    sample_and_write,
    sampling_chain,
)
from admkit.cli.sampling_options import (
    STEPS_HELP,
    add_guidance_options,
    add_sampling_options,
    check_guidance_options,
    check_sampling_options,
    choose_sampler,
    sampler_list,
)
from admkit.errors import UserError
from admkit.generate import check_outputs, draw_labels
from admkit.presets import get_preset
from admkit.samplers import get_sampler


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Draw images from a diffusion model into an .npz (arr_0 uint8 NHWC, arr_1\n"
        "labels), optionally guided by a classifier and/or classifier-free guidance, optionally\n"
        "followed by an upsampler.",
        epilog=f"samplers:\n{sampler_list()}\n\n{STEPS_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sampling_options(parser)
    add_guidance_options(parser)
    group = parser.add_argument_group("cascade")
    add = group.add_argument
    add("--upsampler", default=None, help="upsampler to chain after the model (as --model)")
    add(*spellings("upsampler_preset"), default=None, help="preset of a released upsampler")
    add(*spellings("upsampler_sampler"), default=None, help="upsampler's sampler (default: same)")
    add(
        *spellings("upsampler_steps"),
        type=int,
        default=None,
        help="upsampler's --steps (default: --steps)",
    )
    add_model_options(parser, "model", "classifier")
    parser.set_defaults(run=run)
    return parser


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    args.sampler = choose_sampler(args)
    check_sampling_options(args, args.sampler)
    upsampler_sampler = args.upsampler_sampler or args.sampler
    if args.upsampler:
        get_sampler(upsampler_sampler)
        # A run, a checkpoint folder or weights with a config.json need no options.
        if args.upsampler_preset is None and config_dir(args.upsampler) is None:
            raise UserError(
                f"--upsampler {args.upsampler} is a bare checkpoint: add --upsampler_preset NAME"
            )
    elif args.upsampler_preset or args.upsampler_sampler or args.upsampler_steps is not None:
        raise UserError("the --upsampler_* options need --upsampler M2")
    preset = get_preset(args.preset) if args.preset else None
    check_guidance_options(args)
    check_outputs([args.out, args.grid], args.overwrite, args.png_dir)
    num_samples = args.num_samples or 16

    device = distributed.setup(distributed.select_device(args.device))
    try:
        models = load_base_models(args, preset)
        upsampler = None
        if args.upsampler:
            upsampler = load_model(args.upsampler, "upsampler", None, preset=args.upsampler_preset)
        num_classes = common_num_classes([*models.loaded(), upsampler])
        names = next((m.class_names for m in models.loaded() if m.class_names), None)
        requested = requested_labels(args, num_classes, names)
        labels = None
        if num_classes is not None:
            labels = draw_labels(num_samples, num_classes, args.seed, requested)
        stages = [base_stage(args, models, preset, device)]
        if upsampler is not None:
            image_size = models.model.flags["image_size"]
            if upsampler.flags["small_size"] != image_size:
                raise UserError(
                    f"the upsampler takes {upsampler.flags['small_size']}px images but the model "
                    f"makes {image_size}px ones"
                )
            up_preset = get_preset(args.upsampler_preset) if args.upsampler_preset else None
            up_steps = args.upsampler_steps if args.upsampler_steps is not None else args.steps
            up_diffusion, up_base = sampling_chain(
                upsampler.flags,
                upsampler_sampler,
                up_steps,
                args.step_spacing if up_steps is not None else None,
                up_preset.timestep_respacing if up_preset and up_steps is None else None,
            )
            up_args = argparse.Namespace(**{**vars(args), "cfg_scale": None})
            stages.append(
                build_stage(
                    upsampler,
                    sampler=upsampler_sampler,
                    diffusion=up_diffusion,
                    base=up_base,
                    args=up_args,
                    device=device,
                    noise_stream=UPSAMPLER_STREAM,
                    takes_low_res=True,
                )
            )
        sample_and_write(
            args,
            stages,
            weights={
                "model": args.model,
                "classifier": args.classifier,
                "upsampler": args.upsampler,
                "guide_model": args.guide_model,
            },
            what=args.sampler + (f" then {upsampler_sampler}" if upsampler else ""),
            class_names=models.model.class_names,
            num_samples=num_samples,
            labels=labels,
            device=device,
        )
    finally:
        distributed.teardown()
    return 0
