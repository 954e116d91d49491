"""``admkit nll --model M --data DATA``: the model's negative log-likelihood bound, in bits/dim.

guided-diffusion's ``image_nll.py`` as one command: for each image the full variational bound
(every step's KL term, the decoder's discretised likelihood at t = 0, and the prior term) by
``admkit.losses.calc_bpd_loop``, averaged over the first ``--num_samples`` images of ``DATA`` in
order. Unlike the original, images are not flipped at random (its loader flips them even here)
and each image draws its noise from its own generator (seeded by ``--seed`` and its index), so
the same command gives the same number whatever the batch size or the number of processes.
Under ``torchrun`` the images are shared between the processes and rank 0 prints the result.

``--terms OUT.npz`` writes what the original writes as ``{vb,mse,xstart_mse}_terms.npz``, as
three arrays of one file: the per-step means over the images, entry 0 at t = T-1.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from tqdm.auto import tqdm

from admkit import distributed
from admkit.checkpoint import atomic_path, atomic_write_text
from admkit.cli.models import LoadedModel, build_diffusion, load_model
from admkit.cli.options import add_model_options, spellings
from admkit.cli.training import open_training_data
from admkit.compat.script_util import str2bool
from admkit.data import ImageDataset
from admkit.errors import UserError
from admkit.generate import PRECISIONS, check_outputs, image_generators, network_fn
from admkit.losses import calc_bpd_loop

TERMS = ("vb", "mse", "xstart_mse")
NOISE_STREAM = 0  # image i's noise at every step comes from its own generator on this stream


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="The negative log-likelihood bound of images under a diffusion model, in "
        "bits per dimension (guided-diffusion's image_nll.py): T network evaluations per image.",
    )
    parser.add_argument(
        "--model",
        *spellings("model_path"),
        dest="model",
        required=True,
        help="run directory, checkpoint folder, .safetensors or .pt (with its model options)",
    )
    parser.add_argument(
        *spellings("data"),
        *spellings("data_dir"),
        dest="data",
        required=True,
        help="held-out images: a folder, an .npz or 'digits:heldout'",
    )
    group = parser.add_argument_group("evaluation")
    add = group.add_argument
    add(*spellings("num_samples"), type=int, default=1000, help="images (default 1000)")
    add(*spellings("batch_size"), type=int, default=16, help="images per batch per process")
    add(*spellings("clip_denoised"), type=str2bool, default=True, help="clip x̂_0 (default True)")
    add("--seed", type=int, default=0, help="seed of the noise (per image, as in sampling)")
    add("--precision", default="fp32", help=f"one of: {', '.join(PRECISIONS)} (default fp32)")
    add("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    add("--weights", default=None, help="weights of a run or checkpoint folder: model or ema_RATE")
    add("--json", metavar="OUT", help="also write the numbers to this JSON file")
    add("--terms", metavar="OUT.npz", help="also write the per-step terms (vb, mse, xstart_mse)")
    add("--overwrite", action="store_true", help="replace existing output files")
    add_model_options(parser, "model")
    parser.set_defaults(run=run)
    return parser


def label_map(model: LoadedModel, data: ImageDataset) -> np.ndarray | None:
    """The model's label for each of the data's classes (None for an unconditional model).

    Classes are matched by name where the run recorded its training data's class names, and
    taken in order otherwise (released checkpoints: labels are ImageNet's sorted synsets)."""
    if model.num_classes is None:
        return None
    if data.num_classes == 0:
        raise UserError(f"the model is class-conditional but {data.source} has no labels")
    if model.class_names is None:
        if data.num_classes > model.num_classes:
            raise UserError(
                f"{data.source} has {data.num_classes} classes, the model {model.num_classes}"
            )
        return np.arange(data.num_classes)
    unknown = [name for name in data.class_names if name not in model.class_names]
    if unknown:
        raise UserError(
            f"classes of {data.source} the model was not trained on: {', '.join(unknown[:5])}"
        )
    return np.array([model.class_names.index(name) for name in data.class_names])


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1 or args.batch_size < 1:
        raise UserError("--num_samples and --batch_size must be at least 1")
    if args.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {args.precision!r}; use {', '.join(PRECISIONS)}")
    check_outputs([args.json, args.terms], args.overwrite)
    device = distributed.setup(distributed.select_device(args.device))
    try:
        model = load_model(args.model, "diffusion", args, weights=args.weights, preset=args.preset)
        image_size = model.flags["image_size"]
        data = open_training_data(args.data, image_size, False, "nll")
        labels_of = label_map(model, data)
        diffusion = build_diffusion(model.flags, args.timestep_respacing)
        model_fn = network_fn(
            model.network.to(device),
            class_conditional=model.num_classes is not None,
            precision=args.precision,
            device=device,
        )
        count = min(args.num_samples, len(data))
        mine = list(range(distributed.rank(), count, distributed.world_size()))
        sums = {name: torch.zeros(diffusion.num_timesteps, dtype=torch.float64) for name in TERMS}
        total, prior = [], []
        progress = tqdm(
            total=len(mine), unit="img", disable=not distributed.is_main_process(), leave=False
        )
        with torch.no_grad():
            for start in range(0, len(mine), args.batch_size):
                indices = mine[start : start + args.batch_size]
                batch = [data[i] for i in indices]
                x_0 = torch.stack([image for image, _ in batch]).to(device)
                kwargs = {}
                if labels_of is not None:
                    y = labels_of[[label for _, label in batch]]
                    kwargs["y"] = torch.as_tensor(y, dtype=torch.long, device=device)
                out = calc_bpd_loop(
                    diffusion,
                    model_fn,
                    x_0,
                    clip_denoised=args.clip_denoised,
                    model_kwargs=kwargs,
                    generator=image_generators(args.seed, indices, NOISE_STREAM, device),
                )
                for name in TERMS:
                    sums[name] += out[name].double().sum(dim=0).cpu()
                total.append(out["total_bpd"].double().cpu())
                prior.append(out["prior_bpd"].double().cpu())
                progress.update(len(batch))
        progress.close()
        gathered = distributed.all_gather_objects(
            (torch.cat(total) if total else torch.zeros(0, dtype=torch.float64), prior, sums)
        )
        if distributed.is_main_process():
            report(args, gathered, count, diffusion.num_timesteps)
    finally:
        distributed.teardown()
    return 0


def report(args: argparse.Namespace, gathered: list, count: int, num_timesteps: int) -> None:
    """Print the bound and write ``--json`` / ``--terms`` (rank 0)."""
    total = torch.cat([part[0] for part in gathered]).numpy()
    prior = torch.cat([p for part in gathered for p in part[1]]).numpy()
    terms = {name: sum(part[2][name] for part in gathered).numpy() / count for name in TERMS}
    stderr = total.std(ddof=1) / np.sqrt(count) if count > 1 else float("nan")
    numbers = {
        "bpd": float(total.mean()),
        "bpd_stderr": float(stderr),
        "prior_bpd": float(prior.mean()),
        "num_images": count,
        "num_timesteps": num_timesteps,
    }
    print(
        f"bits/dim {numbers['bpd']:.4f} ± {numbers['bpd_stderr']:.4f} (standard error) over "
        f"{count} images, {num_timesteps} steps each; prior term {numbers['prior_bpd']:.6f}"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(numbers, indent=2) + "\n", overwrite=args.overwrite)
    if args.terms:
        with atomic_path(args.terms, overwrite=args.overwrite) as temporary:
            with open(temporary, "wb") as file:
                np.savez(file, **terms)
