"""``admkit train-classifier --data DATA --out RUN [options]``: the noise-aware classifier.

guided-diffusion's ``classifier_train.py`` as one command (SPEC §2.3): the EncoderUNet learns
p_φ(y | x_t, t) on x_t = q_sample(x_0, t) at t uniform over the full chain (x_0 itself at t = 0
with ``--noised False``), by cross-entropy. The log holds loss, acc@1 and acc@5 on the training
batches (by timestep quartile too) and, with ``--val_data``, ``val_loss``, ``val_acc@1`` and
``val_acc@5`` on one validation batch every ``--eval_interval`` steps.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import default_collate

from admkit import distributed
from admkit.cli import training
from admkit.cli.models import build_diffusion, build_network
from admkit.cli.options import add_model_options, preset_flags, resolve_flags, spellings
from admkit.data import ImageDataset, StepBatchSampler
from admkit.errors import UserError
from admkit.gradients import EVALUATION_STREAM, example_generators
from admkit.objectives import ClassifierLoss
from admkit.train import TrainConfig

DESCRIPTION = (
    "Train a noise-aware classifier (the EncoderUNet) for classifier guidance. Rerunning the "
    "same command resumes the run."
)
EPILOG = (
    "--classifier_use_fp16 True means --precision fp16 (autocast with loss scaling). Example: "
    "admkit train-classifier --data digits --out runs/clf --image_size 8 --classifier_width 32 "
    "--classifier_depth 1 --classifier_attention_resolutions '' --steps 500"
)
VALIDATION_TERMS = ("loss", "acc@1", "acc@5")


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text, description=DESCRIPTION, epilog=EPILOG)
    training.add_run_options(parser)
    add_model_options(parser, "classifier")
    training.add_training_options(parser, "classifier")
    group = parser.add_argument_group("classifier training")
    training.add_flag(
        group,
        "noised",
        default=True,
        help="train on noised x_t at uniform t (default: True); False: clean images, t = 0",
    )
    group.add_argument(
        *spellings("val_data"),
        *spellings("val_data_dir"),
        dest="val_data",
        default=None,
        metavar="DATA",
        help="validation images (same forms as --data), logged as val_loss, val_acc@1/@5",
    )
    group.add_argument(
        *spellings("eval_interval"),
        type=int,
        metavar="N",
        default=5,
        help="evaluate one validation batch every N steps (default: 5)",
    )
    parser.set_defaults(run=run)
    return parser


class Validation:
    """One validation batch every ``eval_interval`` steps, averaged into the next log record.

    The batch evaluated after ``step`` updates is fixed by (seed, step), and each example's t and
    noise come from a generator of (seed, step, its position in the batch) apart from the
    training ones, so validation never changes what training draws and does not depend on the
    number of processes. The network runs in eval mode, without gradients.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        loss_fn: ClassifierLoss,
        dataset: ImageDataset,
        config: TrainConfig,
        eval_interval: int,
    ) -> None:
        self.network, self.loss_fn, self.dataset = network, loss_fn, dataset
        self.config, self.eval_interval = config, eval_interval
        self.sums = torch.zeros(len(VALIDATION_TERMS) + 1, dtype=torch.float64)
        self.done_at: int | None = None

    def before_step(self, step: int) -> None:
        """Called as the batch of ``step`` is drawn: evaluate now unless a log step owns it.

        The evaluation after a log step's updates goes into that step's record (``on_log``);
        a run resumed at such a step then does not count it a second time.
        """
        if step % self.config.log_interval:
            self.evaluate(step)

    def evaluate(self, step: int) -> None:
        """Evaluate after ``step`` updates, if due and not done yet (at most once per step)."""
        if step == 0 or step % self.eval_interval or self.done_at == step:
            return
        self.done_at = step
        rank, world_size = distributed.rank(), distributed.world_size()
        sampler = StepBatchSampler(
            len(self.dataset),
            self.config.batch_size,
            seed=self.config.seed,
            rank=rank,
            world_size=world_size,
        )
        keys = sampler.keys(step // self.eval_interval - 1)
        x_0, y = default_collate([self.dataset[key] for key in keys])
        device = next(self.network.parameters()).device
        first = rank * sampler.batch_size  # positions in the global batch, as in training
        generators = example_generators(
            self.config.seed, step, range(first, first + len(keys)), device, EVALUATION_STREAM
        )
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        was_training = self.network.training
        self.network.eval()
        try:
            with torch.no_grad(), autocast:
                terms = self.loss_fn(self.network, (x_0.to(device), y.to(device)), generators)
        finally:
            self.network.train(was_training)
        for i, key in enumerate(VALIDATION_TERMS):
            self.sums[i] += terms[key].double().sum().cpu()
        self.sums[-1] += len(y)

    def on_log(self, step: int) -> dict[str, Any]:
        """The ``val_*`` means since the last record (collective: every rank calls it)."""
        self.evaluate(step)
        totals = distributed.all_reduce_sum_(self.sums.clone())
        self.sums.zero_()
        if totals[-1] == 0:
            return {}
        return {
            f"val_{key}": (totals[i] / totals[-1]).item() for i, key in enumerate(VALIDATION_TERMS)
        }


def run(args: argparse.Namespace) -> int:
    training.check_out(args.out)
    base = preset_flags(args.preset, "classifier") if args.preset else None
    flags = resolve_flags(args, "classifier", base)
    if args.eval_interval < 1:
        raise UserError(f"--eval_interval {args.eval_interval} must be at least 1")
    config = training.train_config(args, use_fp16=flags["classifier_use_fp16"])
    image_size = flags["image_size"]
    dataset = training.open_training_data(
        args.data, image_size, args.random_flip, "train-classifier"
    )
    num_classes, _ = training.label_rows(dataset, flags.get("num_classes"), 0.0)
    flags["num_classes"] = num_classes
    validation_data = None
    if args.val_data is not None:
        validation_data = training.open_training_data(
            args.val_data, image_size, False, "train-classifier"
        )
        if validation_data.num_classes > num_classes:
            raise UserError(
                f"--val_data {args.val_data} has {validation_data.num_classes} classes, more "
                f"than the {num_classes} of --data"
            )

    torch.manual_seed(args.seed)
    network = build_network("classifier", flags)
    # The classifier learns every step of the full chain: sampling maps respaced steps to them.
    diffusion = build_diffusion(flags, timestep_respacing="") if args.noised else None
    loss_fn = ClassifierLoss(diffusion)
    on_log = before_step = None
    if validation_data is not None:
        validation = Validation(network, loss_fn, validation_data, config, args.eval_interval)
        on_log, before_step = validation.on_log, validation.before_step
    config_json = training.run_config(
        "classifier",
        flags,
        dataset,
        args.data,
        num_classes=num_classes,
        cfg_null_label=None,
        objective={"noised": bool(args.noised)},
    )
    return training.fit(
        args,
        "train-classifier",
        network,
        loss_fn,
        dataset,
        config,
        config_json,
        on_log=on_log,
        before_step=before_step,
    )
