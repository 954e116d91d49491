"""What the sampling commands (``sample``, ``upsample``, ``sweep``) share once their options are
checked (``admkit.cli.sampling_options``): the networks of a base stage, loaded and checked
against each other, one sampling stage from a loaded model (chain, sampler, guidance,
precision), the labels asked for, the kept batches of an interrupted job, and the output files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from admkit import distributed
from admkit.cli.models import LoadedModel, build_diffusion, load_model
from admkit.cli.sampling_options import ETA_SAMPLERS, parse_interval
from admkit.diffusion import Diffusion, ModelFn, respace
from admkit.errors import UserError
from admkit.generate import (
    Stage,
    compiled_for_sampling,
    generate,
    network_fn,
    save_grid,
    save_image_folder,
    save_samples,
)
from admkit.guidance import (
    classifier_free_model,
    classifier_grad_fn,
    dynamic_threshold,
    guidance_interval,
    guided_by_model,
    zero_cond_fn,
)
from admkit.partial_samples import PartialSamples, file_identity, weights_identity
from admkit.presets import Preset
from admkit.samplers import levels_for_steps
from admkit.step_selection import default_step_spacing, select_timesteps

BASE_STREAM, UPSAMPLER_STREAM = 1, 2  # generator streams of the two stages of a cascade


def sampling_chain(
    flags: dict,
    sampler: str,
    steps: int | None,
    spacing: str | None,
    respacing: str | None,
) -> tuple[Diffusion, Diffusion]:
    """The chain to sample on, and the unrespaced chain of the model's training."""
    base = build_diffusion(flags, "")
    spacing = spacing or default_step_spacing(sampler)
    if steps is not None:
        levels = levels_for_steps(sampler, steps)
        if levels > base.num_timesteps:
            raise UserError(
                f"--steps {steps} asks for {levels} steps of a {base.num_timesteps}-step model"
            )
        return respace(base, select_timesteps(base, levels, spacing)), base
    return build_diffusion(flags, respacing), base


# What a guide model must share with the model it guides, so that their outputs are the same
# quantity at the same noise level: (flag, what it is called in the error).
GUIDE_MUST_MATCH = (
    ("image_size", "image size"),
    ("diffusion_steps", "diffusion steps"),
    ("noise_schedule", "noise schedule"),
    ("predict_xstart", "predict_xstart (what the network predicts)"),
    ("rescale_timesteps", "rescale_timesteps (how the network reads t)"),
)


def check_guide(model: LoadedModel, guide: LoadedModel) -> None:
    """Refuse a guide whose outputs do not mean what the model's do, naming both."""
    for flag, what in GUIDE_MUST_MATCH:
        mine, theirs = model.flags.get(flag), guide.flags.get(flag)
        if mine != theirs:
            raise UserError(
                f"the guide model {guide.source} has {what} {theirs!r} but the model "
                f"{model.source} has {mine!r}; a guide must share the model's image size and "
                "noise schedule"
            )


def model_fn_of(loaded: LoadedModel, args: argparse.Namespace, device: torch.device) -> ModelFn:
    """A loaded network as a model function, compiled with ``--compile``."""
    network = loaded.network.to(device)
    return network_fn(
        compiled_for_sampling(network) if args.compile else network,
        class_conditional=loaded.num_classes is not None,
        precision=args.precision,
        device=device,
    )


@dataclass(frozen=True)
class BaseModels:
    """The networks of a base sampling stage, loaded and checked against each other."""

    model: LoadedModel
    classifier: LoadedModel | None = None
    classifier_scale: float = 1.0
    guide: LoadedModel | None = None

    def loaded(self) -> list[LoadedModel]:
        return [m for m in (self.model, self.classifier, self.guide) if m is not None]


def load_base_models(
    args: argparse.Namespace,
    preset: Preset | None,
    load: Callable[..., LoadedModel] = load_model,
) -> BaseModels:
    """The model, classifier and guide that ``args`` name (``load``: ``load_model`` or a
    caching stand-in with its signature). A released model's preset brings its classifier's
    preset and guidance scale unless the options say otherwise."""
    model = load(args.model, "diffusion", args, weights=args.weights, preset=args.preset)
    classifier, scale = None, args.classifier_scale
    if args.classifier:
        classifier_preset = args.classifier_preset or (preset.classifier if preset else None)
        classifier = load(args.classifier, "classifier", args, preset=classifier_preset)
        if classifier.flags["image_size"] != model.flags["image_size"]:
            raise UserError(
                f"the classifier takes {classifier.flags['image_size']}px images but the model "
                f"makes {model.flags['image_size']}px ones"
            )
        if scale is None:
            scale = preset.classifier_scale if preset and preset.classifier_scale else 1.0
    guide = None
    if args.guide_model:
        guide_preset = args.guide_preset or args.preset
        guide = load(args.guide_model, "diffusion", args, weights=args.guide_weights,
                     preset=guide_preset)  # fmt: skip
        check_guide(model, guide)
    return BaseModels(model, classifier, 1.0 if scale is None else scale, guide)


def common_num_classes(models: Iterable[LoadedModel | None]) -> int | None:
    """The number of classes the conditional ones among ``models`` share (None if none is)."""
    counts = {m.source: m.num_classes for m in models if m is not None}
    known = {k for k in counts.values() if k is not None}
    if len(known) > 1:
        raise UserError(f"the models disagree on the number of classes: {counts}")
    return known.pop() if known else None


def base_stage(
    args: argparse.Namespace, models: BaseModels, preset: Preset | None, device: torch.device
) -> Stage:
    """The first (or only) stage of ``admkit sample``, on the chain that ``args`` ask for."""
    respacing = args.timestep_respacing
    if respacing is None and preset is not None:
        respacing = preset.timestep_respacing
    diffusion, base = sampling_chain(
        models.model.flags, args.sampler, args.steps, args.step_spacing, respacing
    )
    return build_stage(
        models.model,
        sampler=args.sampler,
        diffusion=diffusion,
        base=base,
        args=args,
        device=device,
        noise_stream=BASE_STREAM,
        classifier=models.classifier,
        classifier_scale=models.classifier_scale,
        guide=models.guide,
        guide_scale=args.guide_scale if models.guide is not None else 1.0,
    )


def sampler_options(
    sampler: str, base: Diffusion, *, eta: float | None = None, s_churn: float | None = None
) -> dict[str, Any]:
    """The sampler's own keyword arguments: η where it takes one, Heun's churn and the model's
    own noise levels (``base``, the unrespaced chain) that Heun rounds its levels to."""
    options: dict[str, Any] = {}
    if sampler in ETA_SAMPLERS:
        options["eta"] = eta or 0.0
    if sampler == "heun":
        options.update(s_churn=s_churn or 0.0, noise_levels=base)
    return options


def image_shape(kind: str, flags: dict) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images a model of ``kind`` makes (an upsampler: its large size)."""
    size = flags["large_size"] if kind == "upsampler" else flags["image_size"]
    return (3, size, size)


def build_stage(
    loaded: LoadedModel,
    *,
    sampler: str,
    diffusion: Diffusion,
    base: Diffusion,
    args: argparse.Namespace,
    device: torch.device,
    noise_stream: int,
    classifier: LoadedModel | None = None,
    classifier_scale: float = 1.0,
    guide: LoadedModel | None = None,
    guide_scale: float = 1.0,
    takes_low_res: bool = False,
) -> Stage:
    """One sampling stage: the network as a model function with its guidance wrapped in.

    A ``guide`` at ``guide_scale`` 1 is the model itself, and a classifier at scale 0 adds
    nothing: neither is evaluated at all.
    """
    interval = parse_interval(args.guidance_interval)
    model_fn = model_fn_of(loaded, args, device)
    if guide is not None and guide_scale != 1:
        guided = guided_by_model(model_fn, model_fn_of(guide, args, device), guide_scale)
        model_fn = guidance_interval(guided, model_fn, base, *interval) if interval else guided
    if args.cfg_scale is not None:
        if loaded.cfg_null_label is None:
            raise UserError(
                f"--cfg_scale needs a model trained with label dropout (--cfg_dropout); "
                f"{loaded.source} has no null label"
            )
        guided = classifier_free_model(model_fn, args.cfg_scale, loaded.cfg_null_label)
        model_fn = guidance_interval(guided, model_fn, base, *interval) if interval else guided
    cond_fn = None
    if classifier is not None and classifier_scale != 0:
        # The classifier runs outside autocast: its gradient is taken in float32.
        cond_fn = classifier_grad_fn(classifier.network.to(device), classifier_scale)
        if interval:
            cond_fn = guidance_interval(cond_fn, zero_cond_fn, base, *interval)
    return Stage(
        model_fn=model_fn,
        diffusion=diffusion,
        shape=image_shape(loaded.kind, loaded.flags),
        sampler=sampler,
        options=sampler_options(sampler, base, eta=args.eta, s_churn=args.s_churn),
        cond_fn=cond_fn,
        clip_denoised=args.clip_denoised,
        denoised_fn=dynamic_threshold(args.dynamic_threshold) if args.dynamic_threshold else None,
        noise_stream=noise_stream,
        takes_low_res=takes_low_res,
    )


def requested_labels(
    args: argparse.Namespace, num_classes: int | None, class_names: list[str] | None
) -> list[int] | None:
    """``--class_label`` as label numbers: a number is taken as it is, a name is looked up in
    the class names the run recorded from its training data."""
    if not args.class_label:
        return None
    if num_classes is None:
        raise UserError(
            "--class_label was given, but the model is unconditional and nothing guides it; "
            "drop --class_label or add --classifier"
        )
    labels = []
    for value in args.class_label:
        if value.strip().lstrip("-").isdigit():
            labels.append(int(value))
        elif class_names and value in class_names:
            labels.append(class_names.index(value))
        elif class_names:
            shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
            raise UserError(f"unknown class {value!r}; this model's classes are: {shown}")
        else:
            raise UserError(
                f"--class_label {value!r}: this model has no class names (only runs record "
                "them); give the label number"
            )
    return labels


# What does not change the images (batch size: image i depends on (seed, i) alone), or is where
# they go: a rerun that changes only these continues an interrupted job.
NOT_PART_OF_THE_JOB = {
    *("out", "grid", "png_dir", "overwrite", "batch_size", "run", "command", "argv"),
}


# The option that picks the weights of a weights argument of ``sample_and_write``.
CHOSEN_WEIGHTS = {"model": "weights", "guide_model": "guide_weights"}


def sample_and_write(
    args: argparse.Namespace,
    stages: list[Stage],
    *,
    weights: dict[str, str | None],
    inputs: dict[str, str] | None = None,
    what: str,
    class_names: list[str] | None,
    **generate_options: Any,
) -> None:
    """Draw the job's images (``generate``), write the outputs, then drop the kept batches.

    The batches are kept in ``admkit.partial_samples`` as they come, so that a rerun of an
    interrupted job draws only what is missing; the options, the identity of each weights
    argument in ``weights`` and of the files in ``inputs`` decide which job it is.
    """
    options = {
        key: value
        for key, value in sorted(vars(args).items())
        if key not in NOT_PART_OF_THE_JOB and not callable(value)
    }
    job = {
        "options": options,
        "weights": {
            name: weights_identity(spec, getattr(args, CHOSEN_WEIGHTS.get(name, ""), None))
            for name, spec in weights.items()
            if spec
        },
        "inputs": {name: file_identity(path) for name, path in (inputs or {}).items()},
    }
    partial = PartialSamples(args.out, job, overwrite=args.overwrite)
    main = distributed.is_main_process()
    if partial.done and main:
        print(
            f"admkit {args.command}: continuing an interrupted job: {len(partial.done)} images "
            f"kept in {partial.folder}",
            file=sys.stderr,
        )
    try:
        result = generate(
            stages,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=True,
            partial=partial,
            **generate_options,
        )
    except KeyboardInterrupt:
        if main:
            print(
                f"admkit {args.command}: {len(partial.done)} images are kept in {partial.folder}; "
                "rerun the same command to continue",
                file=sys.stderr,
            )
        raise
    write_outputs(args, result, what, class_names)
    if main:
        partial.remove()


def write_outputs(
    args: argparse.Namespace, result, what: str, class_names: list[str] | None = None
) -> None:
    """Rank 0 writes the npz (and grid, and image folder) and says what it did."""
    if result.images is None:
        return
    save_samples(args.out, result.images, result.labels, overwrite=args.overwrite)
    if args.grid:
        save_grid(args.grid, result.images, overwrite=args.overwrite)
    if args.png_dir:
        save_image_folder(
            args.png_dir, result.images, result.labels, class_names, overwrite=args.overwrite
        )
    evals = " + ".join(str(n) for n in result.num_model_evals)
    shape = "x".join(str(n) for n in result.images.shape)
    folder = f" and one PNG each into {args.png_dir}" if args.png_dir else ""
    print(
        f"wrote {shape} samples to {args.out}{folder} ({what}; {evals} network evaluations per "
        "image)"
    )
