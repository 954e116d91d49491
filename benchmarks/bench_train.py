"""Training throughput and peak memory: admkit's loop in fp32 / bf16, compiled or not, against
the original's training step (its network arithmetic, ``common.reference_network``; float32,
per-parameter bookkeeping, no compilation) in the same run.

Every configuration trains in its own process (so the CPU's peak RSS is that configuration's) on
random in-memory batches, data loading left out, with the diffusion loss of ``admkit train``
(L_hybrid, uniform t). admkit's side is ``admkit.train.train`` itself (AdamW, EMA, logging).
The reference re-states the original's ``TrainLoop.run_step`` in float32 on one process
(reference §6.1, §6.2, §6.4): zero each parameter's gradient; the loss, logged per key and per
quartile of t with ``.item()``/NumPy; backward; the gradient and parameter norms it logs every
step, one ``.item()`` per parameter; ``AdamW.step`` as the original constructs it (torch's
default implementation, a per-parameter loop on a CPU); the EMA update, one parameter at a time.
The first interval of ``--interval`` steps is warm-up (and compilation); images/s is the median
over the following intervals. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU, the
process's max RSS on the CPU. One JSON line per configuration.

Then (``--pairs on``, the default) each admkit configuration again, paired: admkit's loop and
the reference train side by side in one process (two copies of the network), a reference
interval right after each admkit interval; its line ("impl": "admkit, paired") gives the median
of the per-interval ratios, which a shared machine's drift between processes leaves intact
(its memory figures would mix both, so it has none).

    python benchmarks/bench_train.py                      # small 32px model, CPU or GPU
    python benchmarks/bench_train.py --image_size 64 --num_channels 128 --batch_size 32
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from admkit.allocator import keep_freed_memory  # noqa: E402
from admkit.cli.models import build_diffusion, build_network  # noqa: E402
from admkit.compat import script_util  # noqa: E402
from admkit.objectives import DiffusionLoss  # noqa: E402
from admkit.timestep_sampling import UniformSampler  # noqa: E402
from admkit.train import TrainConfig, train  # noqa: E402
from common import SMALL, device_name, emit, reference_network, synchronize  # noqa: E402


def flags_for(args: argparse.Namespace) -> dict:
    flags = {**script_util.model_and_diffusion_defaults(), **SMALL}
    flags.update(
        image_size=args.image_size,
        num_channels=args.num_channels,
        channel_mult=args.channel_mult,
        num_classes=10,
        use_checkpoint=args.use_checkpoint,
    )
    return flags


def config_name(args: argparse.Namespace) -> str:
    name = f"{args.image_size}px-{args.num_channels}ch"
    return name + "-checkpointed" if args.use_checkpoint else name


def random_batches(args: argparse.Namespace, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x_0 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)

    def batches(start_step: int):
        while True:
            yield x_0, y

    return batches


def reference_trainer(args, network, loss_fn, device: torch.device):
    """The original's float32 training step (see the module text), as a function that trains
    one interval of ``args.interval`` steps and returns its images/s."""
    params = list(network.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    rate = 0.9999
    ema = [p.detach().clone() for p in params]
    x_0, y = next(random_batches(args, device)(0))
    num_timesteps = loss_fn.diffusion.num_timesteps
    logged: dict[str, list[float]] = collections.defaultdict(list)

    def interval() -> float:
        network.train()
        synchronize(device)
        start = time.perf_counter()
        with reference_network():
            for _ in range(args.interval):
                for p in params:
                    if p.grad is not None:
                        p.grad.detach_()
                        p.grad.zero_()
                terms = loss_fn(network, (x_0, y), None)
                weight = terms["weight"]
                loss = (terms["loss"] * weight).mean()
                t = terms["t"].cpu().numpy()
                for key in ("loss", "mse", "vb"):
                    values = terms[key] * weight
                    logged[key].append(values.mean().item())
                    for sub_t, sub_loss in zip(t, values.detach().cpu().numpy()):
                        logged[f"{key}_q{int(4 * sub_t / num_timesteps)}"].append(sub_loss)
                loss.backward()
                logged["grad_norm"].append(sum((p.grad**2).sum().item() for p in params) ** 0.5)
                logged["param_norm"].append(sum((p**2).sum().item() for p in params) ** 0.5)
                optimizer.step()
                with torch.no_grad():
                    for average, p in zip(ema, params):
                        average.mul_(rate).add_(p, alpha=1 - rate)
        synchronize(device)
        return args.interval * args.batch_size / (time.perf_counter() - start)

    return interval


def admkit_rates(args, network, loss_fn, device, precision, compiled, on_log=None) -> list[float]:
    """images/s per interval of ``admkit.train.train`` (its own log records)."""
    config = TrainConfig(
        steps=args.interval * (args.intervals + 1),
        batch_size=args.batch_size,
        lr=1e-4,
        ema_rates=(0.9999,),
        precision=precision,
        log_interval=args.interval,
        save_interval=10**9,
        compile=compiled,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        batches = random_batches(args, device)
        train(
            network, loss_fn, batches, config, run_dir, device=device, progress=False, on_log=on_log
        )
        records = (Path(run_dir) / "log.jsonl").read_text().splitlines()
    return [json.loads(line)["images_per_s"] for line in records]


def build(args, device: torch.device) -> tuple[torch.nn.Module, DiffusionLoss]:
    flags = flags_for(args)
    torch.manual_seed(0)
    network = build_network("diffusion", flags).to(device)
    diffusion = build_diffusion(flags)
    return network, DiffusionLoss(
        diffusion, UniformSampler(diffusion.num_timesteps), class_cond=True
    )


def measure_paired(args, precision: str, compiled: bool) -> dict:
    """admkit's loop and the reference in one process, each admkit interval followed by a
    reference interval (from ``train``'s log hook), so that both see the same machine state;
    the speed-up is the median of the per-interval ratios after the warm-up interval."""
    device = torch.device(args.device)
    network, loss_fn = build(args, device)
    reference_model, reference_loss = build(args, device)
    reference_interval = reference_trainer(args, reference_model, reference_loss, device)
    reference = []
    own = admkit_rates(
        args,
        network,
        loss_fn,
        device,
        precision,
        compiled,
        on_log=lambda step: reference.append(reference_interval()),
    )
    ratios = [a / r for a, r in zip(own[1:], reference[1:])]
    return dict(
        bench="train",
        device=device_name(device),
        config=config_name(args),
        batch_size=args.batch_size,
        impl="admkit, paired",
        dtype=precision,
        compile=compiled,
        images_per_s=round(statistics.median(own[1:]), 2),
        reference_images_per_s=round(statistics.median(reference[1:]), 2),
        speedup=round(statistics.median(ratios), 3),
    )


def measure(args: argparse.Namespace, impl: str, precision: str, compiled: bool) -> dict:
    """Train one configuration in this process; returns its JSON record."""
    if impl == "paired":
        return measure_paired(args, precision, compiled)
    device = torch.device(args.device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    network, loss_fn = build(args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    if impl == "reference":
        interval = reference_trainer(args, network, loss_fn, device)
        rates = [interval() for _ in range(args.intervals + 1)]
    else:
        rates = admkit_rates(args, network, loss_fn, device, precision, compiled)
    wall = time.perf_counter() - start
    record = dict(
        bench="train",
        device=device_name(device),
        config=config_name(args),
        parameters=sum(p.numel() for p in network.parameters()),
        batch_size=args.batch_size,
        impl=impl,
        dtype=precision,
        compile=compiled,
        images_per_s=round(statistics.median(rates[1:]), 2),
        wall_s=round(wall, 1),
    )
    if device.type == "cuda":
        record["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        record["peak_rss_mb"] = round(peak, 1)
        record["rss_before_model_mb"] = round(rss_before, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num_channels", type=int, default=64)
    parser.add_argument("--channel_mult", default="1,2,2")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--interval", type=int, default=5, help="steps per timed interval")
    parser.add_argument("--intervals", type=int, default=3, help="timed intervals after warm-up")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument(
        "--use_checkpoint",
        action="store_true",
        help="gradient checkpointing of every block (the model flag), in both paths",
    )
    parser.add_argument(
        "--compile", default=None, help="off, on or off,on (default: off,on on a GPU, off on CPU)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument(
        "--pairs",
        default="on",
        choices=("on", "off"),
        help="also time each admkit configuration paired with the reference in one process",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        keep_freed_memory()  # as `admkit`'s command line does (training is measured unaffected)
        impl, precision, compiled = json.loads(args.worker)
        print(json.dumps(measure(args, impl, precision, compiled)), flush=True)
        return

    compile_modes = args.compile or ("off,on" if args.device.startswith("cuda") else "off")
    runs = [("reference", "fp32", False)]
    for precision in args.dtypes.split(","):
        for mode in compile_modes.split(","):
            runs.append(("admkit", precision, mode == "on"))
    if args.pairs == "on":
        runs += [("paired", precision, compiled) for _, precision, compiled in runs[1:]]
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    for impl, precision, compiled in runs:
        command = [sys.executable, __file__, *passthrough]
        command += ["--worker", json.dumps([impl, precision, compiled])]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            error = f"timed out after {args.timeout} s"
            emit(dict(bench="train", impl=impl, dtype=precision, compile=compiled, error=error))
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            emit(dict(bench="train", impl=impl, dtype=precision, compile=compiled, error=last))
            continue
        record = json.loads(lines[-1])
        if compiled and "torch.compile failed" in done.stderr:
            record["compile"] = "failed, ran eager"
        emit(record)


if __name__ == "__main__":
    main()
