"""torchrun environment, the few collective helpers the training loop needs, and Ctrl-C.

Everything here is a thin layer over ``torch.distributed``: ``torchrun`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (plus the rendezvous variables), :func:`setup` joins the process
group (NCCL on GPUs, gloo on CPUs) and the helpers below become collective. Without ``torchrun``
every helper is a cheap no-op for a world of one process, so the same code runs either way.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from admkit.errors import UserError


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a ``torchrun`` launch (rank 0 of 1 when not launched by it)."""

    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as ``torchrun`` sets them."""

    def read(name: str, default: int) -> int:
        text = os.environ.get(name)
        if text is None or text == "":
            return default
        try:
            return int(text)
        except ValueError:
            raise UserError(
                f"environment variable {name}={text!r} is not an integer; launch with torchrun "
                "or unset it"
            ) from None

    world_size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(
            f"RANK={rank} and WORLD_SIZE={world_size} do not fit (need 0 <= RANK < WORLD_SIZE); "
            "launch with torchrun"
        )
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def select_device(requested: str | None = None) -> torch.device:
    """The device this process computes on.

    ``requested`` None picks this process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else
    the CPU. A named CUDA device without CUDA is a user mistake.
    """
    local_rank = launch_env().local_rank
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(
            f"unknown device {requested!r}; use cpu, cuda or cuda:N (or leave it unset)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {requested!r} asked for, but CUDA is not available; use cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup(device: torch.device | None = None) -> torch.device:
    """Join the ``torchrun`` process group (if launched by it) and return this process's device.

    NCCL when the device is a GPU, gloo otherwise. Calling it again, or without ``torchrun``, only
    returns the device.
    """
    device = device if device is not None else select_device()
    env = launch_env()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return device


def teardown() -> None:
    """Leave the process group (a no-op when none was joined).

    A process that ``torchrun`` launched should then end with :func:`exit_process`.
    """
    if dist.is_available() and dist.is_initialized():
        # A last barrier, so that no process leaves while the others still talk to it.
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` at once, without the interpreter's finalization.

    For processes launched by ``torchrun``, after :func:`teardown`. gloo's worker threads (which
    outlive ``destroy_process_group``) release each finished collective a moment after it
    completes, and releasing a tensor that Python code handed in takes the GIL. When that moment
    falls into the interpreter's finalization, CPython ends the thread and the process aborts
    ("terminate called without an active exception"; a core dump showed the worker in
    ``ProcessGroupGloo::runLoop`` destroying a finished barrier's work). Everything a command
    writes is closed by then, so only the standard streams need flushing.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(code)


def is_distributed() -> bool:
    """True when a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on the process that writes files and prints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all processes, in place; returns it."""
    if is_distributed():
        # gloo has no AVG reduction, so sum then divide on every backend.
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0, in rank order.

    All processes must pass tensors of the same shape: ``[N, ...]`` -> ``[world_size * N, ...]``.
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` in rank order (a list of one without a process group)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class StopRequest:
    """Ctrl-C (or SIGTERM) as a request to stop at the next point where every process agrees.

    Inside ``with StopRequest() as stop:`` the first signal only sets ``stop.requested``; a long
    loop polls :meth:`agreed` at each step boundary, so the processes of a ``torchrun`` job stop
    after the same step. The handlers are put back after the first signal, so a second Ctrl-C
    interrupts at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopRequest:
        # Python only lets the main thread install signal handlers.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def agreed(self, device: torch.device) -> bool:
        """Whether any process was asked to stop (collective under DDP: call on every rank)."""
        if not is_distributed():
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        return all_reduce_sum_(flag).item() > 0
