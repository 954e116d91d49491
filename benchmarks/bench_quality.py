"""Sample quality per number of model evaluations, and classifier guidance's effect, on digits.

Given a digits diffusion run (``--model``, e.g. the demo's ``demo/diffusion``) and, for the
guidance sweep, a noise-aware classifier run (``--classifier``, e.g. ``demo/classifier``), prints
one JSON line per measurement:

- ``quality_floor``: real training digits against the held-out ones, the best a model can hope
  for with this many images;
- ``quality``: for every sampler and every budget of network evaluations in ``--evals``, the
  Fréchet distance and precision/recall of ``--num_samples`` samples against the held-out digits,
  the evaluations actually spent per image (heun spends 2·levels - 1) and the seconds;
- ``guidance``: for one sampler and budget, at every classifier scale in ``--scales``, the judged
  accuracy (share of samples an independent judge classifies as the requested digit; image i asks
  for digit i mod 10, so scale 0 gives chance, about 10%) and the same quality figures.

Features and classifications come from the judge of ``admkit demo`` (``admkit.judge``): loaded
from ``--judge`` when that file exists, otherwise trained as the demo trains it (and saved there
when ``--judge`` is given). Sampling runs in this process through ``admkit.generate`` with
per-image seeds, so image i is the same at any batch size. The Fréchet distance of a few hundred
images is biased upwards; compare rows of one run, not with Inception FIDs.

    python benchmarks/bench_quality.py --model demo/diffusion --classifier demo/classifier \\
        --judge demo/judge.pt
    python benchmarks/bench_quality.py --model demo/diffusion --num_samples 100 --evals 5,20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from admkit.checkpoint import atomic_path  # noqa: E402
from admkit.cli.demo import JUDGE_STEPS, SEED  # noqa: E402
from admkit.cli.models import LoadedModel, load_model  # noqa: E402
from admkit.cli.sampling import BASE_STREAM, sampling_chain  # noqa: E402
from admkit.data import digits_heldout, digits_train  # noqa: E402
from admkit.errors import UserError  # noqa: E402
from admkit.generate import PRECISIONS, Stage, dequantize, generate, network_fn  # noqa: E402
from admkit.guidance import classifier_grad_fn  # noqa: E402
from admkit.judge import DigitJudge, judge_outputs, train_judge  # noqa: E402
from admkit.metrics.fid import frechet_distance, statistics_of  # noqa: E402
from admkit.metrics.precision_recall import precision_recall  # noqa: E402
from admkit.samplers import SAMPLERS, levels_for_steps  # noqa: E402
from admkit.step_selection import STEP_SPACINGS  # noqa: E402
from common import device_name, emit  # noqa: E402

NUM_DIGITS = 10


def numbers(text: str, kind: type) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"expected a comma list of {kind.__name__}s, got {text!r}") from None


def real_digits(part: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training or held-out digits: images ``[N, 3, S, S]`` in [-1, 1] and labels ``[N]``."""
    dataset = digits_train(image_size) if part == "train" else digits_heldout(image_size)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, torch.as_tensor(np.asarray(dataset.labels))


def get_judge(path: str | None, image_size: int) -> tuple[DigitJudge, str]:
    """The demo's judge from ``path``, or one trained as the demo trains it (saved to ``path``)."""
    if path and Path(path).exists():
        judge = DigitJudge()
        judge.load_state_dict(torch.load(path, weights_only=True))
        return judge.eval(), path
    print(f"[bench_quality] training the judge ({JUDGE_STEPS} steps)", file=sys.stderr)
    judge = train_judge(*real_digits("train", image_size), steps=JUDGE_STEPS, seed=SEED)
    if path:
        with atomic_path(path) as temporary:
            torch.save(judge.state_dict(), temporary)
    return judge, path or f"trained ({JUDGE_STEPS} steps)"


def score(
    judge: DigitJudge, x: torch.Tensor, reference: np.ndarray, labels: torch.Tensor | None = None
) -> dict:
    """Fréchet distance and precision/recall of images x ``[N, 3, S, S]`` against the reference
    features ``[M, 128]``, and with ``labels`` ``[N]`` the share the judge classifies as them."""
    features, predicted = judge_outputs(judge, x)
    precision, recall = precision_recall(reference, features)
    figures = {
        "frechet_distance": round(
            frechet_distance(statistics_of(features), statistics_of(reference)), 3
        ),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
    }
    if labels is not None:
        figures["judged_accuracy"] = round(float((predicted == labels.numpy()).mean()), 4)
    return figures


def sample(
    model: LoadedModel,
    sampler: str,
    evals: int,
    args: argparse.Namespace,
    device: torch.device,
    labels: torch.Tensor | None,
    cond_fn=None,
) -> tuple[torch.Tensor, int, float]:
    """``args.num_samples`` images ``[N, 3, S, S]`` in [-1, 1] (as saved: quantized to uint8),
    the network evaluations each took and the seconds it all took."""
    diffusion, base = sampling_chain(model.flags, sampler, evals, args.step_spacing, None)
    size = model.flags["image_size"]
    stage = Stage(
        model_fn=network_fn(
            model.network,
            class_conditional=model.num_classes is not None,
            precision=args.precision,
            device=device,
        ),
        diffusion=diffusion,
        shape=(3, size, size),
        sampler=sampler,
        # As admkit sample: heun rounds its churned levels to the model's own steps.
        options={"noise_levels": base} if sampler == "heun" else {},
        cond_fn=cond_fn,
        noise_stream=BASE_STREAM,
    )
    start = time.perf_counter()
    result = generate(
        [stage],
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        labels=labels,
        device=device,
    )
    seconds = time.perf_counter() - start
    return dequantize(result.images), result.num_model_evals[0], round(seconds, 2)


def check(args: argparse.Namespace) -> None:
    """Cheap checks of the options, before any model is loaded or judge trained."""
    for sampler in args.samplers + [args.guided_sampler]:
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
    for sampler in args.samplers:
        for evals in args.evals:
            levels_for_steps(sampler, evals)
    levels_for_steps(args.guided_sampler, args.guided_evals)
    if args.step_spacing is not None and args.step_spacing not in STEP_SPACINGS:
        raise UserError(f"--step_spacing must be one of {', '.join(STEP_SPACINGS)}")
    if args.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if args.num_samples < 2:
        raise UserError(f"--num_samples must be at least 2 (a covariance), got {args.num_samples}")
    if any(s < 0 for s in args.scales):
        raise UserError(f"--scales must be 0 or more, got {args.scales}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model", required=True, help="digits diffusion run directory (e.g. demo/diffusion)")
    add("--classifier", default=None, help="noise-aware classifier run (omit: no guidance rows)")
    add("--judge", default=None, help="judge weights; trained (and saved here) when missing")
    add("--num_samples", "--num-samples", type=int, default=1000)
    add("--evals", default="5,10,20,50,100,250", help="network evaluations per image")
    add("--samplers", default=",".join(SAMPLERS), help="comma list (default: all)")
    add(
        "--step_spacing",
        "--step-spacing",
        default=None,
        help=f"{', '.join(STEP_SPACINGS)} (default: uniform; karras for heun, logsnr for dpm++)",
    )
    add("--scales", default="0,1,3,10", help="classifier scales of the guidance rows")
    add("--guided_sampler", "--guided-sampler", default="ddpm")
    add("--guided_evals", "--guided-evals", type=int, default=100)
    add("--batch_size", "--batch-size", type=int, default=250)
    add("--precision", default="fp32", help=", ".join(PRECISIONS))
    add("--seed", type=int, default=0)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.evals, args.scales = numbers(args.evals, int), numbers(args.scales, float)
    args.samplers = numbers(args.samplers, str)
    check(args)
    device = torch.device(args.device)

    model = load_model(args.model, "diffusion")
    classifier = load_model(args.classifier, "classifier") if args.classifier else None
    size = model.flags["image_size"]
    if classifier and classifier.flags["image_size"] != size:
        raise UserError(
            f"the classifier takes {classifier.flags['image_size']}px images, not {size}"
        )
    # Every chain up front, so a budget the model cannot give fails before any sampling.
    for sampler in args.samplers:
        for evals in args.evals:
            sampling_chain(model.flags, sampler, evals, args.step_spacing, None)
    model.network.to(device)

    judge, judge_source = get_judge(args.judge, size)
    reference, _ = judge_outputs(judge, real_digits("heldout", size)[0])
    common = dict(
        device=device_name(device),
        model=args.model,
        judge=judge_source,
        reference="digits:heldout",
        num_reference=len(reference),
        step_spacing=args.step_spacing,
        dtype=args.precision,
        seed=args.seed,
    )
    train_images = real_digits("train", size)[0][: args.num_samples]
    emit(
        dict(
            bench="quality_floor",
            **common,
            source="digits:train",
            num_samples=len(train_images),
            **score(judge, train_images, reference),
        )
    )

    # Image i asks for digit i mod 10: only read by a class-conditional model or a classifier.
    labels = torch.arange(args.num_samples) % NUM_DIGITS
    conditional = model.num_classes is not None
    for sampler in args.samplers:
        for budget in args.evals:
            x, evals, seconds = sample(
                model, sampler, budget, args, device, labels if conditional else None
            )
            emit(
                dict(
                    bench="quality",
                    **common,
                    sampler=sampler,
                    steps=budget,
                    evals=evals,
                    num_samples=args.num_samples,
                    **score(judge, x, reference, labels if conditional else None),
                    seconds=seconds,
                )
            )

    if classifier is None:
        return
    classifier.network.to(device)
    for scale in args.scales:
        cond_fn = classifier_grad_fn(classifier.network, scale) if scale > 0 else None
        x, evals, seconds = sample(
            model, args.guided_sampler, args.guided_evals, args, device, labels, cond_fn
        )
        emit(
            dict(
                bench="guidance",
                **common,
                classifier=args.classifier,
                sampler=args.guided_sampler,
                steps=args.guided_evals,
                evals=evals,
                classifier_scale=scale,
                classifier_gradients=evals if cond_fn else 0,
                num_samples=args.num_samples,
                **score(judge, x, reference, labels),
                seconds=seconds,
            )
        )


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"bench_quality: error: {error}")
