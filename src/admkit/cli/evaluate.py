"""``admkit evaluate REF.npz SAMPLES.npz``: the paper's five numbers for a sample batch.

Inception Score, FID, sFID, precision and recall with guided-diffusion's definitions
(``admkit.metrics``). Under ``torchrun`` the feature extraction is shared between ranks and rank 0
prints the table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from admkit import distributed
from admkit.errors import UserError
from admkit.metrics.evaluate import (
    FEATURE_BATCH_SIZE,
    EvaluationResult,
    evaluate,
    open_batch,
    read_precomputed_statistics,
)
from admkit.metrics.inception_weights import ENV_VAR, load_inception


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Inception Score, FID, sFID, precision and recall of a sample batch against "
        "a reference batch, as guided-diffusion's evaluator computes them.",
    )
    parser.add_argument("ref_batch", metavar="REF.npz", help="reference batch (arr_0 [, mu ...])")
    parser.add_argument("sample_batch", metavar="SAMPLES.npz", help="sample batch (arr_0)")
    parser.add_argument(
        "--inception_weights",
        "--inception-weights",
        metavar="PATH",
        help=f"FID Inception weights (default: ${ENV_VAR}, then the torch hub cache)",
    )
    parser.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=FEATURE_BATCH_SIZE,
        help="images per Inception forward (default %(default)s)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    parser.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.set_defaults(run=run)
    return parser


def format_table(result: EvaluationResult) -> str:
    """The five numbers as a two-column table."""
    score = "n/a" if result.inception_score is None else f"{result.inception_score:.4f}"
    rows = [
        ("Inception Score", score),
        ("FID", f"{result.fid:.4f}"),
        ("sFID", f"{result.sfid:.4f}"),
        ("Precision", f"{result.precision:.4f}"),
        ("Recall", f"{result.recall:.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise UserError(f"--json {args.json} exists; pass --overwrite to replace it")
    # Check both files before the (slow) weights and network.
    reference = open_batch(args.ref_batch, "reference")
    sample = open_batch(args.sample_batch, "sample")
    precomputed = read_precomputed_statistics(args.ref_batch)
    device = distributed.setup(distributed.select_device(args.device))
    try:
        model = load_inception(args.inception_weights, device)
        main_process = distributed.is_main_process()
        if not model.has_logits and main_process:
            print(
                "note: these Inception weights have no 1008-class layer; "
                "the Inception Score is not available",
                file=sys.stderr,
            )
        result = evaluate(
            reference, sample, model, args.batch_size, progress=True, precomputed=precomputed
        )
    finally:
        distributed.teardown()
    if result is None:
        return 0
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return 0
