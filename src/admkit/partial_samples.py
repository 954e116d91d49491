"""The finished batches of a sampling job, kept so that an interrupted job continues where it
stopped instead of starting over.

They live in a folder beside the job's output, ``.OUT.partial/``: ``job.json`` (everything that
determines the images: options, seed, labels, which weights) and one ``batch_NNNNNNNNN.npz`` per
gathered batch (``indices``, ``images`` uint8 ``[n, H, W, 3]``, ``evals``: network evaluations per
image and stage), each written atomically by rank 0. Image i depends on (seed, i) alone, not on
the batch or process it is drawn in (``admkit.generate``), so a job finished from its parts
equals an uninterrupted one bit for bit, whatever batch size the rerun uses. The folder is
removed once the output is written. Every process reads the folder (a shared file system, as
for training runs); only rank 0 writes it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from admkit.checkpoint import (
    MANIFEST,
    atomic_path,
    atomic_write_text,
    is_checkpoint_folder,
    latest_checkpoint,
)
from admkit.distributed import barrier, is_main_process
from admkit.errors import UserError

JOB_FILE = "job.json"


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What tells a file's contents apart without reading it: its path, size and change time."""
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def weights_identity(spec: str | os.PathLike, weights: str | None = None) -> dict[str, Any] | None:
    """``file_identity`` of the weights a ``--model``-style argument reads: a file itself, a
    checkpoint folder's manifest, or the manifest of a run's newest checkpoint (so that a run
    that has trained on since is another job); with ``weights`` naming a file that was added to
    the checkpoint after it was saved (``admkit ema``), that file's identity too."""
    path = Path(spec)
    if not path.is_dir():
        return file_identity(path)
    checkpoint = path if is_checkpoint_folder(path) else latest_checkpoint(path)
    if checkpoint is None:
        return None
    identity = file_identity(checkpoint / MANIFEST)
    added = checkpoint / f"{weights}.safetensors"
    if weights is not None and added.is_file():
        identity["weights_file"] = file_identity(added)
    return identity


class PartialSamples:
    """The parts of the job that writes ``output``, described by the JSON-able ``job``.

    A folder left by the same job is continued; one left by another job is a user error unless
    ``overwrite`` (then it is discarded). ``done`` lists the image indices already drawn (read
    once here; rank 0's ``add`` extends it). Call on every rank.
    """

    def __init__(self, output: str | os.PathLike, job: Mapping[str, Any], *, overwrite: bool):
        output = Path(output)
        self.folder = output.with_name(f".{output.name}.partial")
        self.job = json.loads(json.dumps(job, sort_keys=True, default=str))
        stored = self._stored_job()
        if stored is not None and stored != self.job and not overwrite:
            raise UserError(
                f"{self.folder} holds the parts of an interrupted job with other options; rerun "
                "that command to finish it, or pass --overwrite to discard them"
            )
        barrier()  # every rank has read the folder before rank 0 changes it
        if is_main_process():
            if stored is not None and stored != self.job:
                shutil.rmtree(self.folder)
            self.folder.mkdir(exist_ok=True)
            if stored != self.job:
                atomic_write_text(self.folder / JOB_FILE, json.dumps(self.job, indent=2) + "\n")
        barrier()
        self.done: list[int] = []
        for part in self._parts():
            with np.load(part) as archive:
                self.done.extend(archive["indices"].tolist())

    def _stored_job(self) -> dict[str, Any] | None:
        if not self.folder.is_dir():
            return None
        try:
            return json.loads((self.folder / JOB_FILE).read_text())
        except (OSError, ValueError):
            return {}  # unreadable: not this job's

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("batch_*.npz"))

    def load_into(self, images: np.ndarray) -> tuple[int, ...]:
        """Copy the drawn images into their rows of ``images``; the evaluations per image."""
        evals: tuple[int, ...] = ()
        for part in self._parts():
            with np.load(part) as archive:
                images[archive["indices"]] = archive["images"]
                evals = tuple(archive["evals"].tolist())
        return evals

    def add(self, indices: np.ndarray, images: np.ndarray, evals: tuple[int, ...]) -> None:
        """Keep one gathered batch (rank 0). Its first index names it: no two batches share one."""
        path = self.folder / f"batch_{int(indices[0]):09d}.npz"
        with atomic_path(path, overwrite=True) as temporary:
            with open(temporary, "wb") as file:
                np.savez(file, indices=indices, images=images, evals=np.asarray(evals))
        self.done.extend(indices.tolist())

    def remove(self) -> None:
        """Drop the parts once the output holds every image (rank 0)."""
        shutil.rmtree(self.folder, ignore_errors=True)
