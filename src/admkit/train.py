"""One training loop for everything admkit trains: diffusion models, classifiers, upsamplers.

The loop does not know what it trains. It receives

- ``model``: a ``torch.nn.Module``;
- ``loss_fn(model, batch, generators) -> dict``: per-example terms of a micro-batch of ``n``
  examples. ``"loss"`` ``[n]`` is required and is what gets minimised. Optional: ``"weight"``
  ``[n]`` importance weights (the objective is the mean of ``weight * loss``; the timestep
  resampler of improved DDPM returns ``1 / (T p_t)`` here), ``"t"`` ``[n]`` integer timesteps
  with ``"num_timesteps"`` (T, an int) to log every term by timestep quartile
  ``q = floor(4 t / T)``. Every other entry is a ``[n]`` term that is only logged (``"mse"``,
  ``"vb"``, ``"acc@1"``...). ``generators`` holds one ``torch.Generator`` per example, seeded
  by (seed, step, the example's index in the global batch): a loss that draws each example's
  random numbers from that example's generator gives the same weights on any number of
  processes and with any ``microbatch``, and a resumed run draws the same numbers;
- ``batches(start_step) -> Iterator``: this process's share of the global batch of step
  ``start_step``, then of the next steps; a batch is a tensor or a (nested) tuple, list or dict
  of tensors whose first dimension is the example. The iterator is closed (when it has
  ``close``, as generators do) when ``train`` returns or raises, stopping any loading processes.

Each step's gradient comes from :func:`admkit.gradients.forward_backward` (micro-batches, the
examples' generators, autocast). The model ``loss_fn`` receives may be wrapped (DDP,
``torch.compile``): call it, don't read its attributes. ``loss_fn`` may also carry state across
steps (a loss-aware timestep sampler): if it has ``observe(terms)``, it is called after every
step that was applied, on every rank, with the detached terms of the whole global batch
(``[batch_size]`` each, ranks concatenated); if it has ``state_dict()`` /
``load_state_dict()``, that state is checkpointed with the run.

``after_step(step, weights)``, when given, is called on every rank after every step, before the
step's checkpoint (so a run resumed from that checkpoint has it done): ``weights(name)`` returns
the state dict of the weights ``name`` keeps (``model``, ``ema_RATE``, ``phema_S``: see
:func:`kept_weight_names`), the live tensors, to be read and not changed. A mapping it returns on
rank 0 becomes a log record of its own, ``{"step": step, **mapping}``. Its time is left out of
images/s, and the global random generators are put back as it found them, so drawing samples in
it changes nothing in the training (admkit.monitor draws sample grids and metrics there).

Notation: θ model parameters, θ̄_r their moving average at rate r, η_k the learning rate of step
k (k = 0, 1, ... optimizer steps done), η the base rate, K = ``lr_anneal_steps``.

    η_k = η (1 - k / K)              (linear annealing, set before step k; η_k = η when K = 0)
    θ̄_r <- r θ̄_r + (1 - r) θ         (after every applied step, θ̄_r kept in float32)
    θ̂_γ <- β_t θ̂_γ + (1 - β_t) θ     (--phema: after every step t = 1, 2, ..., applied or not;
                                      β_t = (1 - 1/t)^(γ+1), see admkit.phema)

Two places where guided-diffusion's TrainLoop is not followed, on purpose: micro-batch gradients
are averaged, so any ``microbatch`` gives the gradient of the full batch (the original sums
micro-batch means, §12 item 16), and the annealed rate is set before the step (the original's
lags one step). No checkpoint is written at step 0.
"""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from admkit import checkpoint as ckpt
from admkit import distributed as dist
from admkit.compilation import inductor_options
from admkit.errors import UserError
from admkit.gradients import (
    PRECISIONS,
    LossFn,
    example_generators,
    forward_backward,
    map_tensors,
    num_examples,
)
from admkit.noise import derived_seed
from admkit.phema import MAX_SIGMA_REL, ParameterAverages, PowerFunctionEMA
from admkit.runlog import Meter, plot_losses, plot_metrics, truncate_log

BatchSource = Callable[[int], Iterator[Any]]
Weights = Callable[[str], Mapping[str, torch.Tensor]]
AfterStep = Callable[[int, Weights], Mapping[str, Any] | None]
# The seed stream of each process's global generators (dropout); the examples' generators use
# admkit.gradients' streams.
GLOBAL_STREAM = 1
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")  # where torch's AdamW has a fused kernel
# Options that may change when a run is resumed; any other change is refused.
RESUMABLE = (
    "train.steps",
    "train.log_interval",
    "train.save_interval",
    "train.keep",
    "train.compile",
    "train.snapshot_interval",
    "train.snapshot_dtype",
)
SNAPSHOT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Options recorded in config.json only when post-hoc EMA is on, so that runs made before these
# options existed still resume.
PHEMA_OPTIONS = ("phema", "snapshot_interval", "snapshot_dtype")


@dataclass(frozen=True)
class TrainConfig:
    """Training options (SPEC §2.2). ``batch_size`` is global: split evenly over the processes;
    ``microbatch`` is the most examples one process runs through the model at once (<= 0: all,
    as guided-diffusion's -1)."""

    steps: int
    batch_size: int
    microbatch: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0
    ema_rates: tuple[float, ...] = (0.9999,)
    precision: str = "fp32"
    seed: int = 0
    log_interval: int = 10
    save_interval: int = 10000
    keep: int | None = None
    compile: bool = False
    # Post-hoc EMA (EDM2): σ_rel of the power-function EMAs to track, as typed (they name the
    # weights, "phema_0.10"); their snapshots every ``snapshot_interval`` steps (None: at every
    # save) and at the end, stored in ``snapshot_dtype``.
    phema: tuple[str, ...] = ()
    snapshot_interval: int | None = None
    snapshot_dtype: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_interval", "save_interval"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)} must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UserError(f"--lr {self.lr} must be > 0 and --weight_decay >= 0")
        if self.lr_anneal_steps < 0 or 0 < self.lr_anneal_steps < self.steps:
            raise UserError(
                f"--lr_anneal_steps {self.lr_anneal_steps} must be 0 (no annealing) or at least "
                f"--steps {self.steps}, or the learning rate would turn negative"
            )
        if not all(0.0 <= rate <= 1.0 for rate in self.ema_rates):
            raise UserError(f"--ema_rate {self.ema_rates} must hold rates between 0 and 1")
        if len(set(self.ema_rates)) != len(self.ema_rates):
            raise UserError(f"--ema_rate {self.ema_rates} lists a rate twice")
        if self.precision not in PRECISIONS:
            raise UserError(
                f"--precision {self.precision!r} must be one of {', '.join(PRECISIONS)}"
            )
        if self.keep is not None and self.keep < 1:
            raise UserError(f"--keep {self.keep} must be at least 1 (or unset to keep all)")
        _check_phema(self)


def _check_phema(config: TrainConfig) -> None:
    given = ",".join(config.phema)
    values = []
    for label in config.phema:
        try:
            value = float(label) if label == label.strip() else math.nan  # labels name files
        except ValueError:
            value = math.nan
        if not 0.0 < value < MAX_SIGMA_REL:  # also refuses nan
            raise UserError(
                f"--phema {given}: sigma_rel {label!r} must be a number between 0 and "
                f"{MAX_SIGMA_REL:.4f} (1/sqrt(12); wider profiles would favour early steps), "
                "e.g. --phema 0.05,0.10"
            )
        if value in values:
            raise UserError(f"--phema {given} lists sigma_rel {value} twice")
        values.append(value)
    if config.snapshot_interval is not None and not config.phema:
        raise UserError(
            "--snapshot_interval stores snapshots of the post-hoc EMAs: it needs --phema, "
            "e.g. --phema 0.05,0.10"
        )
    if config.snapshot_interval is not None and config.snapshot_interval < 1:
        raise UserError(f"--snapshot_interval {config.snapshot_interval} must be at least 1")
    if config.snapshot_dtype not in SNAPSHOT_DTYPES:
        raise UserError(
            f"--snapshot_dtype {config.snapshot_dtype!r} must be one of "
            f"{', '.join(SNAPSHOT_DTYPES)}"
        )
    if config.snapshot_dtype != "fp32" and not config.phema:
        raise UserError("--snapshot_dtype is the precision of --phema snapshots: it needs --phema")


class EMA(ParameterAverages):
    """Exponential moving averages of a model's parameters at several rates (the keys), in
    float32."""

    def update(self, model: torch.nn.Module) -> None:
        """θ̄_r <- r θ̄_r + (1 - r) θ for every rate r."""
        self._move_towards(model, {rate: 1.0 - rate for rate in self.averages})


def _lr_at(config: TrainConfig, step: int) -> float:
    if config.lr_anneal_steps == 0:
        return config.lr
    return config.lr * (1.0 - step / config.lr_anneal_steps)


def _wrap(model: torch.nn.Module, device: torch.device, compile_model: bool) -> torch.nn.Module:
    module = model
    if compile_model:
        try:
            module = torch.compile(model, options=inductor_options(device))
        except Exception as error:  # a platform without a working compiler stack
            warnings.warn(f"torch.compile failed ({error}); training without it", stacklevel=3)
    if dist.is_distributed():
        device_ids = [device] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=device_ids)
    return module


def _apply_gradients(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> tuple[bool, float]:
    """Take the optimizer step unless a gradient is inf/NaN; returns (applied, gradient norm)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm(
        [p.grad for p in model.parameters() if p.grad is not None]
    ).item()
    if scaler is None:
        if math.isfinite(grad_norm):
            optimizer.step()
        return math.isfinite(grad_norm), grad_norm
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips the update by itself when it found inf/NaN
    scaler.update()
    return scaler.get_scale() >= scale, grad_norm  # the scale only drops after a skipped step


def kept_weight_names(config: TrainConfig) -> list[str]:
    """The weights a run keeps and checkpoints, in order: ``model``, ``ema_RATE`` per
    ``ema_rates``, ``phema_S`` per ``phema`` label."""
    emas = [f"ema_{rate}" for rate in config.ema_rates]
    return ["model", *emas, *(f"phema_{label}" for label in config.phema)]


def _append_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    with open(run_dir / ckpt.LOG_NAME, "a") as log_file:
        log_file.write(json.dumps(record) + "\n")


def _recorded(config: TrainConfig) -> dict[str, Any]:
    """The training options for config.json (the post-hoc EMA ones only when used)."""
    recorded = asdict(config)
    if not config.phema:
        for name in PHEMA_OPTIONS:
            del recorded[name]
    return recorded


def _load_training_state(
    latest: Path,
    model: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    loss_fn: LossFn,
    device: torch.device,
    phema: PowerFunctionEMA | None = None,
) -> dict[str, Any]:
    """Put back everything a checkpoint holds; returns its training state."""
    model.load_state_dict(ckpt.read_weights(latest, "model"))
    for rate in ema.averages:
        ema.load_state_dict(rate, ckpt.read_weights(latest, f"ema_{rate}"))
    for label in phema.averages if phema is not None else ():
        phema.load_state_dict(label, ckpt.read_weights(latest, f"phema_{label}"))
    state = ckpt.read_training_state(latest)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])
    if hasattr(loss_fn, "load_state_dict") and state.get("loss_fn") is not None:
        loss_fn.load_state_dict(state["loss_fn"])
    rng = state["rng"]
    if len(rng) != dist.world_size():
        warnings.warn(
            f"resuming {len(rng)}-process training on {dist.world_size()} processes: the run "
            "continues, but not bit-identically",
            stacklevel=3,
        )
    ckpt.restore_rng_state(rng[dist.rank() % len(rng)], device)
    return state


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: BatchSource,
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    run_config: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    on_log: Callable[[int], Mapping[str, float] | None] | None = None,
    after_step: AfterStep | None = None,
    progress: bool = True,
    save_on_interrupt: bool = True,
) -> Path | None:
    """Train ``model`` for ``config.steps`` optimizer steps, resuming ``run_dir`` from its newest
    complete checkpoint; returns the final checkpoint.

    ``run_config`` (JSON-able: what rebuilds the model and its loss) goes to ``config.json`` with
    the training options under ``"train"``. Under ``torchrun`` the process group is joined here
    and each process takes ``batch_size / world_size`` examples per step from ``batches``.
    ``on_log(step)``, called on every rank at each log step, may add values to the log record;
    ``after_step(step, weights)``: see the module docstring.
    Ctrl-C finishes the current step, saves (``save_on_interrupt``) and raises KeyboardInterrupt.
    """
    device = dist.setup(dist.select_device(str(device)) if device is not None else None)
    rank, world_size, main = dist.rank(), dist.world_size(), dist.is_main_process()
    if config.batch_size % world_size:
        raise UserError(
            f"--batch_size {config.batch_size} does not split over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    if "train" in (run_config or {}):
        raise ValueError("run_config must not hold a 'train' entry: the loop stores its own")
    run_dir = ckpt.prepare_run_dir(
        run_dir,
        {**(run_config or {}), "train": _recorded(config)},
        overwrite=overwrite,
        may_differ=RESUMABLE,
    )
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        # One kernel over all parameters instead of torch's per-parameter loop on a CPU.
        fused=device.type in FUSED_OPTIMIZER_DEVICES,
    )
    ema = EMA(model, config.ema_rates)
    phema = PowerFunctionEMA(model, config.phema) if config.phema else None
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    say = tqdm.write if progress and main else lambda message: None

    # 1. Resume from the newest complete checkpoint, or seed a fresh run.
    latest = ckpt.latest_checkpoint(run_dir)
    step = skipped_total = 0
    if latest is not None:
        state = _load_training_state(latest, model, ema, optimizer, scaler, loss_fn, device, phema)
        step, skipped_total = state["step"], state["skipped_steps"]
        say(f"resuming {run_dir} from step {step}")
    else:
        seed = derived_seed(config.seed, GLOBAL_STREAM, rank)
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
    if main:
        truncate_log(run_dir, step)
        ckpt.drop_snapshots_after(run_dir, step)
    dist.barrier()

    # The kept weights by name, as the checkpoint stores them and after_step reads them.
    averages = [partial(ema.state_dict, model, rate) for rate in config.ema_rates]
    averages += [partial(phema.state_dict, model, label) for label in config.phema]
    state_dicts = dict(zip(kept_weight_names(config), [model.state_dict, *averages]))

    def named_weights(name: str) -> Mapping[str, torch.Tensor]:
        if name not in state_dicts:
            raise ValueError(
                f"the run keeps no weights {name!r}; it keeps {', '.join(state_dicts)}"
            )
        return state_dicts[name]()

    def save() -> None:
        rng_states = dist.all_gather_objects(ckpt.capture_rng_state(device))
        if main:
            weights = {name: state_dict() for name, state_dict in state_dicts.items()}
            state = {
                "step": step,
                "skipped_steps": skipped_total,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "loss_fn": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
                "rng": rng_states,
            }
            ckpt.save_checkpoint(run_dir, step, weights, state, keep=config.keep)
            plot_losses(run_dir)
        dist.barrier()

    snapshot_interval = config.snapshot_interval or config.save_interval

    def write_snapshot() -> None:
        if main:
            tensors = phema.snapshot(SNAPSHOT_DTYPES[config.snapshot_dtype])
            ckpt.write_snapshot(run_dir, step, tensors, phema.metadata(step))

    local_batch = config.batch_size // world_size
    mine = range(rank * local_batch, (rank + 1) * local_batch)  # positions in the global batch

    def compute(module: torch.nn.Module, batch: Any) -> dict[str, Any]:
        optimizer.zero_grad(set_to_none=True)
        return forward_backward(
            module,
            loss_fn,
            batch,
            microbatch=config.microbatch,
            generators=example_generators(config.seed, step, mine, device),
            precision=config.precision,
            scaler=scaler,
        )

    module = _wrap(model, device, config.compile)
    compile_unproven = module is not model and config.compile
    meter, saved_at, at_boundary = Meter(), (step if latest else None), False
    source = iter(batches(step))
    bar = tqdm(total=config.steps, initial=step, unit="step", disable=not (progress and main))
    with dist.StopRequest() as stop:
        try:
            while step < config.steps:
                # 2. Gradients of the mean loss over the global batch of step `step`.
                batch = next(source, None)
                if batch is None:
                    raise ValueError(f"the batch source ran out at step {step}")
                if num_examples(batch) != local_batch:
                    raise ValueError(
                        f"step {step}: got {num_examples(batch)} examples, expected "
                        f"{local_batch} (batch_size {config.batch_size} / {world_size} processes)"
                    )
                batch = map_tensors(batch, lambda x: x.to(device, non_blocking=True))
                lr = _lr_at(config, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if compile_unproven:
                    before = ckpt.capture_rng_state(device)
                    try:
                        terms = compute(module, batch)
                    except Exception as error:
                        # torch.compile fails lazily, at the first call: redo the step eagerly
                        # from the same random state, so the run matches one without --compile.
                        first_line = str(error).splitlines()[0] if str(error) else repr(error)
                        warnings.warn(
                            f"torch.compile failed ({first_line}); training without it",
                            stacklevel=2,
                        )
                        module = _wrap(model, device, compile_model=False)
                        ckpt.restore_rng_state(before, device)
                        terms = compute(module, batch)
                    compile_unproven = False
                else:
                    terms = compute(module, batch)

                # 3. The update, skipped when a gradient is inf/NaN (weights and EMA unchanged).
                applied, grad_norm = _apply_gradients(model, optimizer, scaler)
                if applied:
                    ema.update(model)
                    meter.grad_norms.append(grad_norm)
                    if hasattr(loss_fn, "observe"):
                        loss_fn.observe(_gather_terms(terms))
                else:
                    meter.skipped += 1
                    skipped_total += 1
                if phema is not None:
                    # After every step, skipped ones too (θ unchanged): t counts steps, and each
                    # average keeps its exact power-function profile over them.
                    phema.update(model, step + 1)
                meter.add(terms)
                meter.steps += 1
                step += 1
                bar.update(1)

                # 4. Log, run after_step, save, and stop here if Ctrl-C was pressed.
                if step % config.log_interval == 0 or step == config.steps:
                    record = meter.record(step, lr, config.batch_size)
                    record["skipped_total"] = skipped_total
                    if scaler is not None:
                        record["loss_scale"] = scaler.get_scale()
                    record.update((on_log(step) if on_log is not None else None) or {})
                    if main:
                        _append_record(run_dir, record)
                        bar.set_postfix(loss=f"{record.get('loss', math.nan):.4g}")
                    meter = Meter()
                if phema is not None and (step % snapshot_interval == 0 or step == config.steps):
                    write_snapshot()  # before the checkpoint: a resume starts after its step
                if after_step is not None:
                    with meter.paused():  # not training time
                        rng_state = ckpt.capture_rng_state(device)
                        extra = after_step(step, named_weights)
                        ckpt.restore_rng_state(rng_state, device)
                        if extra and main:
                            _append_record(run_dir, {"step": step, **extra})
                            plot_metrics(run_dir)
                if step % config.save_interval == 0 or step == config.steps:
                    save()
                    saved_at = step
                if stop.agreed(device):
                    at_boundary = True
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            # Only at a step boundary is the state consistent enough to save.
            if save_on_interrupt and at_boundary and saved_at != step:
                say(f"interrupted: saving step {step}")
                save()
            raise
        finally:
            bar.close()
            # Stop the source now (its loading processes, if any), not whenever it is collected.
            close_source = getattr(source, "close", None)
            if close_source is not None:
                close_source()
    return ckpt.latest_checkpoint(run_dir)


def _gather_terms(terms: Mapping[str, Any]) -> dict[str, Any]:
    """The terms of the whole global batch, ranks concatenated in order."""
    return {
        key: dist.all_gather_cat(value) if isinstance(value, torch.Tensor) else value
        for key, value in terms.items()
    }
