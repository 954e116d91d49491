"""A toy training run for the training tests: in-process helpers, and a script for subprocesses.

The model is a two-layer MLP learning a fixed linear map. The batch of step k is drawn from a
generator seeded with k and split over the ranks, so any world size sees the same global batch
(the contract of admkit.data's batch sources). The "noisy" loss uses every source of randomness a
diffusion loss may use (the examples' generators, NumPy's and Python's global generators,
dropout), so an exact resume has to restore them all.

Run as a script (alone or under torchrun):
    python tests/toy_train.py --out RUN --steps 12 [--noisy] [--sleep 0.1] [--microbatch 2] ...
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

DIM = 4
T = 8  # the toy's number of "timesteps", for the quartile logging


def toy_model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, 16),
        torch.nn.SiLU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(16, DIM),
    )


def toy_batches(batch_size: int, rank: int = 0, world_size: int = 1):
    """``batches(start_step)``: the rank's share of the global batch of each step."""
    true_map = torch.linspace(-1.0, 1.0, DIM * DIM).reshape(DIM, DIM)
    local = batch_size // world_size

    def batches(start_step: int):
        step = start_step
        while True:
            generator = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(batch_size, DIM, generator=generator)
            part = slice(rank * local, (rank + 1) * local)
            yield {"x": x[part], "y": (x @ true_map)[part]}
            step += 1

    return batches


def plain_loss(model, batch, generators):
    """Deterministic per-example squared error ``[n]``."""
    return {"loss": ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)}


def noisy_loss(model, batch, generators):
    """Squared error on noised inputs, with timesteps and importance weights."""
    from admkit.noise import randn

    x = batch["x"]
    n = x.shape[0]
    # NumPy's global generator draws t, as guided-diffusion's schedule samplers do.
    t = torch.from_numpy(np.random.randint(0, T, size=n)).long()
    noise = randn(x.shape, generator=generators)  # each example's noise from its generator
    weight = torch.tensor([0.5 + random.random() for _ in range(n)])
    prediction = model(x + noise * (t[:, None] + 1) / T)
    loss = ((prediction - batch["y"]) ** 2).mean(dim=1)
    return {"loss": loss, "mse": loss.detach(), "weight": weight, "t": t, "num_timesteps": T}


def main() -> None:
    from admkit import distributed
    from admkit.train import TrainConfig, train

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--microbatch", type=int, default=0)
    parser.add_argument("--save_interval", type=int, default=3)
    parser.add_argument("--keep", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--noisy", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to be killed)")
    parser.add_argument("--check_collectives", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same arithmetic in every process that is compared

    device = distributed.setup()
    rank, world_size = distributed.rank(), distributed.world_size()
    if args.check_collectives:
        check_collectives(rank, world_size)

    model = toy_model(dropout=0.1 if args.noisy else 0.0)
    base_loss = noisy_loss if args.noisy else plain_loss

    def loss_fn(model, batch, generators):
        time.sleep(args.sleep)
        return base_loss(model, batch, generators)

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rates=(0.9, 0.5),
        log_interval=1,
        save_interval=args.save_interval,
        keep=args.keep,
    )
    batches = toy_batches(args.batch_size, rank, world_size)
    train(model, loss_fn, batches, config, args.out, run_config={"toy": "mlp"}, device=device)
    distributed.teardown()
    if world_size > 1:
        distributed.exit_process(0)  # as the admkit command does under torchrun


def check_collectives(rank: int, world_size: int) -> None:
    """The helpers of admkit.distributed against their definitions, inside a real group."""
    from admkit import distributed

    assert distributed.launch_env().rank == rank and distributed.is_main_process() == (rank == 0)
    value = torch.tensor([float(rank), 1.0])
    distributed.all_reduce_mean_(value)
    assert torch.equal(value, torch.tensor([(world_size - 1) / 2, 1.0])), value
    total = distributed.all_reduce_sum_(torch.tensor([rank + 1]))
    assert total.item() == world_size * (world_size + 1) // 2, total
    gathered = distributed.all_gather_cat(torch.full((2,), rank))
    assert gathered.tolist() == [r for r in range(world_size) for _ in range(2)], gathered
    assert distributed.all_gather_objects({"rank": rank}) == [
        {"rank": r} for r in range(world_size)
    ]
    distributed.barrier()


if __name__ == "__main__":
    main()
