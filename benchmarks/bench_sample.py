"""Sampling throughput per sampler and precision, against the original's way in the same run.

Prints one JSON line per sampler and precision: images/s for a whole run of ``--steps`` network
evaluations, seconds per network evaluation, and the speed per evaluation relative to the reference
point: the plain ancestral loop over the same number of steps with the original's network
arithmetic (``common.reference_network``: einsum attention, upsampling and scale-shift norm as
written), float32, global-generator noise and no autocast. Every figure is the median of
``--repeats`` runs; each run of a sampler is paired with a reference run just before it, and the
speed-up is the median of the paired ratios. Samplers at equal ``--steps`` do equal network work
(heun: 2·levels - 1 evaluations), so their figures differ by the solver's own overhead and
per-image noise; CFG doubles each evaluation's batch. ``--compile`` adds a row of ddpm with the
network compiled as ``admkit sample --compile`` does (compilation not timed).

    python benchmarks/bench_sample.py
    python benchmarks/bench_sample.py --preset imagenet64 --batch_size 16 --steps 25 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from admkit.allocator import keep_freed_memory  # noqa: E402
from admkit.compat import script_util  # noqa: E402
from admkit.diffusion import Diffusion, DiffusionConfig, respace  # noqa: E402
from admkit.generate import compiled_for_sampling, image_generators, network_fn  # noqa: E402
from admkit.guidance import classifier_free_model  # noqa: E402
from admkit.noise import randn  # noqa: E402
from admkit.presets import get_preset  # noqa: E402
from admkit.samplers import SAMPLERS, ddpm_sample, get_sampler, levels_for_steps  # noqa: E402
from admkit.step_selection import select_timesteps  # noqa: E402
from admkit.unet import UNet  # noqa: E402
from common import SMALL, device_name, emit, paired, reference_network, time_call  # noqa: E402


def build(args) -> tuple[UNet, dict]:
    flags = script_util.model_and_diffusion_defaults()
    flags.update(get_preset(args.preset).flags if args.preset else SMALL)
    flags["use_fp16"] = False
    flags["num_classes"] = 1001  # one extra row, as a model trained for CFG has
    return UNet(script_util.model_config(flags)).eval(), flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16")
    parser.add_argument(
        "--compile", action="store_true", help="also time ddpm with the network compiled"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    # Both paths under the allocator settings of `admkit`'s command line, so that the
    # ratios compare computation, not glibc's page faults (see benchmarks/README.md).
    keep_freed_memory()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, flags = build(args)
    model.to(device)
    base = Diffusion.from_config(
        DiffusionConfig(noise_schedule=flags["noise_schedule"], learn_sigma=flags["learn_sigma"])
    )
    size, n = flags["image_size"], args.batch_size
    y = torch.randint(0, 1000, (n,), device=device)
    common = dict(
        bench="sample",
        device=device_name(device),
        config=args.preset or "small-32px",
        batch_size=n,
        steps=args.steps,
    )

    # Warm-up (allocator, kernels), then the reference point: the original's loop and attention.
    x_T = torch.randn(n, 3, size, size, device=device)
    reference_chain = respace(base, select_timesteps(base, args.steps))
    with torch.no_grad():
        model(x_T, torch.zeros(n, dtype=torch.long, device=device), y=y)

    reference_evals_seen = []  # every reference run's count, so each row can show its pairs'

    def reference():
        with reference_network():
            result = ddpm_sample(reference_chain, model, x_T, model_kwargs={"y": y})
        reference_evals_seen.append(result.num_model_evals)
        return result

    seconds = time_call(reference, device, args.repeats, warmup=0)
    reference_evals = reference_evals_seen[-1]
    reference_per_eval = seconds / reference_evals
    emit(
        {
            **common,
            "sampler": "ddpm",
            "impl": "reference",
            "dtype": "fp32",
            "evals": reference_evals,
            "images_per_s": round(n / seconds, 3),
            "s_per_eval": round(reference_per_eval, 4),
            "speedup_per_eval": 1.0,
        }
    )

    for precision in args.precisions.split(","):
        model_fn = network_fn(model, class_conditional=True, precision=precision, device=device)
        runs = [(name, model_fn) for name in SAMPLERS]
        runs.append(("dpm++2m+cfg", classifier_free_model(model_fn, 3.0, 1000)))
        if args.compile:
            network = compiled_for_sampling(model)
            fn = network_fn(network, class_conditional=True, precision=precision, device=device)
            runs.append(("ddpm+compile", fn))
        for name, fn in runs:
            sampler = name.removesuffix("+cfg").removesuffix("+compile")
            chain = respace(base, select_timesteps(base, levels_for_steps(sampler, args.steps)))
            options = {"noise_levels": base} if sampler == "heun" else {}

            def run(fn=fn, sampler=sampler, chain=chain, options=options):
                generators = image_generators(0, range(n), 1, device)
                x = randn((n, 3, size, size), generator=generators, device=device)
                return get_sampler(sampler)(
                    chain, fn, x, model_kwargs={"y": y}, generator=generators, **options
                )

            result = run()  # warm-up (and compilation), not timed
            seconds, ratio = paired(run, reference, device, args.repeats, warmup=0)
            if set(reference_evals_seen[-args.repeats :]) != {reference_evals}:
                raise RuntimeError(f"{name}: its paired reference runs changed their step count")
            per_eval = seconds / result.num_model_evals
            # Per evaluation: the reference takes reference_evals, this sampler result's count.
            speedup = ratio * result.num_model_evals / reference_evals
            emit(
                {
                    **common,
                    "sampler": name,
                    "impl": "admkit",
                    "dtype": precision,
                    "evals": result.num_model_evals,
                    "reference_evals": reference_evals,
                    "images_per_s": round(n / seconds, 3),
                    "s_per_eval": round(per_eval, 4),
                    "speedup_per_eval": round(speedup, 3),
                }
            )


if __name__ == "__main__":
    main()
