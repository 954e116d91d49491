"""The options of the sampling commands (``sample``, ``upsample``, ``sweep``) and the checks that
need no model: samplers and their budgets, guidance options that go together or exclude each
other, guidance intervals.

``--steps K`` is a budget of network evaluations per image: ddpm, ddim, dpm++2m and dpm++2m-sde
respace to K steps, heun to (K + 1) // 2 noise levels (2·levels - 1 evaluations). Without it the
chain is ``--timestep_respacing``, else the preset's respacing, else the model's own.
"""

from __future__ import annotations

import argparse

from admkit.cli.options import spellings
from admkit.compat.script_util import str2bool
from admkit.errors import UserError
from admkit.generate import PRECISIONS
from admkit.samplers import SAMPLER_HELP, SAMPLERS, get_sampler
from admkit.step_selection import STEP_SPACINGS

ETA_SAMPLERS = ("ddim", "dpm++2m")  # the samplers that take --eta
STEPS_HELP = """\
--steps K is a budget of network evaluations per image: ddpm, ddim, dpm++2m and dpm++2m-sde
respace the model to K steps, heun to (K + 1) // 2 noise levels (2 evaluations per level, 1 for
the last).
Without --steps the chain is --timestep_respacing, else the preset's, else the model's own.
--step_spacing picks K levels evenly in steps (uniform, as guided-diffusion), as EDM (karras,
rho 7) or evenly in log-SNR (logsnr); by default uniform, karras for heun, logsnr for dpm++2m
and dpm++2m-sde."""


def sampler_list() -> str:
    return "\n".join(f"  {name:<9} {text}" for name, text in SAMPLER_HELP.items())


def add_sampling_options(parser: argparse.ArgumentParser, *, outputs: bool = True) -> None:
    """Options every sampling command shares (SPEC §2.5); ``outputs``: the sample files
    (``--out``, ``--grid``, ``--png_dir``)."""
    parser.add_argument(
        "--model",
        *spellings("model_path"),
        dest="model",
        required=True,
        help="run directory (its newest checkpoint), checkpoint folder, .safetensors or .pt "
        "(--model_path: guided-diffusion's name)",
    )
    if outputs:
        parser.add_argument("--out", required=True, metavar="OUT.npz", help="samples file to write")
    group = parser.add_argument_group("sampling")
    add = group.add_argument
    add(
        *spellings("num_samples"),
        type=int,
        default=None,
        help="images to draw (default 16; upsample: one per base sample)",
    )
    add(*spellings("batch_size"), type=int, default=16, help="images per batch per process")
    add("--sampler", default=None, help=f"one of: {', '.join(SAMPLERS)} (default ddpm)")
    add(
        *spellings("use_ddim"),
        type=str2bool,
        default=None,
        metavar="BOOL",
        help="guided-diffusion's flag: True means --sampler ddim, False --sampler ddpm",
    )
    add("--steps", type=int, default=None, help="network evaluations per image (see above)")
    add(
        *spellings("step_spacing"),
        default=None,
        help=f"how --steps picks noise levels: {', '.join(STEP_SPACINGS)} "
        "(default uniform; karras for heun, logsnr for dpm++2m and dpm++2m-sde)",
    )
    add(
        "--eta",
        type=float,
        default=None,
        help="η of ddim (default 0) or dpm++2m (default 0, the ODE; η > 0 solves the SDE, and "
        "dpm++2m-sde is η = 1)",
    )
    add(*spellings("s_churn"), type=float, default=None, help="EDM's S_churn (heun only)")
    add(*spellings("clip_denoised"), type=str2bool, default=True, help="clip x̂_0 (default True)")
    add(
        *spellings("dynamic_threshold"),
        type=float,
        default=None,
        metavar="P",
        help="Imagen's dynamic thresholding of x̂_0 at percentile P, e.g. 0.995",
    )
    add(*spellings("cfg_scale"), type=float, default=None, help="classifier-free guidance scale w")
    add(
        *spellings("guidance_interval"),
        default=None,
        metavar="LO,HI",
        help="guide only at original steps LO..HI (e.g. 100,800)",
    )
    add(
        *spellings("class_label"),
        action="append",
        default=None,
        metavar="K|NAME",
        help="class to draw, by number or by the name a run recorded (repeatable, cycled); "
        "default: uniform random per image",
    )
    add("--seed", type=int, default=0, help="same seed, same images, at any batch size")
    if outputs:
        add("--grid", default=None, metavar="PNG", help="also write a picture grid")
        add(
            *spellings("png_dir"),
            default=None,
            metavar="DIR",
            help="also write every image as DIR/CLASS_INDEX.png (DIR/INDEX.png without "
            "labels), named as --data reads classes",
        )
    add("--precision", default="fp32", help=f"one of: {', '.join(PRECISIONS)} (default fp32)")
    add(
        "--compile",
        action="store_true",
        help="compile the network(s) with torch.compile, weights frozen (a first batch of each "
        "shape costs ~20-60 s of compilation; falls back to eager where compiling fails)",
    )
    add("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    add(
        "--weights",
        default=None,
        help="weights of a run or checkpoint folder: model, ema_RATE or phema_SIGMA",
    )
    add("--overwrite", action="store_true", help="replace existing output files")


def add_guidance_options(parser: argparse.ArgumentParser) -> None:
    """Classifier guidance and guidance by a second model (sample and sweep)."""
    group = parser.add_argument_group("classifier guidance")
    add = group.add_argument
    add(
        "--classifier",
        *spellings("classifier_path"),
        dest="classifier",
        default=None,
        help="noise-aware classifier (as --model; --classifier_path: guided-diffusion's name)",
    )
    add(
        *spellings("classifier_scale"),
        type=float,
        default=None,
        help="guidance scale s (0: the classifier is not run; default 1, or the preset's)",
    )
    add(*spellings("classifier_preset"), default=None, help="preset of a released classifier")
    group = parser.add_argument_group(
        "guidance by a second model (autoguidance; EDM2-style CFG with an unconditional guide)"
    )
    add = group.add_argument
    add(
        *spellings("guide_model"),
        default=None,
        metavar="G",
        help="guide network (as --model): D = D_G + W (D_M - D_G) on the mean; a weaker version "
        "of the model (an earlier checkpoint, a smaller run) is autoguidance",
    )
    add(
        *spellings("guide_scale"),
        type=float,
        default=None,
        metavar="W",
        help="guidance weight W (1: the model alone, the guide is not run; typically 1.5-3)",
    )
    add(*spellings("guide_weights"), default=None, help="the guide's weights (as --weights)")
    add(*spellings("guide_preset"), default=None, help="preset of a released guide .pt")


def choose_sampler(args: argparse.Namespace) -> str:
    """``--sampler``, or what guided-diffusion's ``--use_ddim`` asks for (default ddpm)."""
    if args.use_ddim is None:
        return args.sampler or "ddpm"
    implied = "ddim" if args.use_ddim else "ddpm"
    if args.sampler not in (None, implied):
        raise UserError(
            f"--use_ddim {args.use_ddim} means --sampler {implied}, not {args.sampler}; give one "
            "of the two"
        )
    return implied


def check_sampling_options(args: argparse.Namespace, sampler: str) -> None:
    """Cheap checks, before any model is loaded."""
    get_sampler(sampler)
    if args.eta is not None and sampler not in ETA_SAMPLERS:
        raise UserError(
            f"--eta applies to {' and '.join(ETA_SAMPLERS)}, not {sampler}; drop it or change "
            "--sampler"
        )
    if args.eta is not None and args.eta < 0:
        raise UserError(f"--eta must be 0 or more, got {args.eta}")
    if args.s_churn is not None and sampler != "heun":
        raise UserError(f"--s_churn is Heun's; drop it or use --sampler heun (not {sampler})")
    if args.s_churn is not None and args.s_churn < 0:
        raise UserError(f"--s_churn must be 0 or more, got {args.s_churn}")
    if args.steps is not None and args.timestep_respacing is not None:
        raise UserError("give --steps or --timestep_respacing, not both")
    if args.step_spacing is not None and args.step_spacing not in STEP_SPACINGS:
        raise UserError(
            f"unknown --step_spacing {args.step_spacing!r}; use {', '.join(STEP_SPACINGS)}"
        )
    if args.step_spacing not in (None, "uniform") and args.steps is None:
        raise UserError(f"--step_spacing {args.step_spacing} needs --steps K")
    if args.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {args.precision!r}; use {', '.join(PRECISIONS)}")
    if args.dynamic_threshold is not None and not 0 < args.dynamic_threshold <= 1:
        raise UserError("--dynamic_threshold is a percentile in (0, 1], e.g. 0.995")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")


def check_guidance_options(args: argparse.Namespace) -> None:
    """Guidance options that need others, or exclude them (before any model is loaded)."""
    if args.classifier_scale is not None and args.classifier is None:
        raise UserError("--classifier_scale needs a classifier: add --classifier C")
    if args.classifier_scale is not None and args.classifier_scale < 0:
        raise UserError(f"--classifier_scale must be 0 or more, got {args.classifier_scale}")
    if (args.guide_model is None) != (args.guide_scale is None):
        raise UserError("guidance by a second model needs both --guide_model G and --guide_scale W")
    if args.guide_model is None and (args.guide_weights or args.guide_preset):
        raise UserError("--guide_weights and --guide_preset describe a guide: add --guide_model G")
    if args.guide_model is not None and args.cfg_scale is not None:
        raise UserError(
            "--cfg_scale and --guide_model both replace the model's mean; use one (an "
            "unconditional --guide_model is classifier-free guidance with a separate network)"
        )
    parse_interval(args.guidance_interval)
    if args.guidance_interval and not (args.classifier or args.cfg_scale or args.guide_model):
        raise UserError(
            "--guidance_interval needs guidance: --classifier, --cfg_scale or --guide_model"
        )


def parse_interval(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        lo, hi = (int(part) for part in text.split(","))
    except ValueError:
        raise UserError(
            f"--guidance_interval {text!r}: give two step indices, e.g. 100,800"
        ) from None
    if not 0 <= lo <= hi:
        raise UserError(f"--guidance_interval {text!r}: need 0 <= LO <= HI")
    return lo, hi
