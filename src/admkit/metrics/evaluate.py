"""guided-diffusion's evaluator end to end: npz batches in; IS, FID, sFID, precision, recall out.

Batches use the original layout (``reference/evaluation.md`` §1.6): ``arr_0`` uint8 [N, H, W, 3],
streamed out of the zip so 50,000 samples never sit in memory as images; a reference batch may
carry precomputed whole-dataset statistics ``mu``, ``sigma`` (2048) and ``mu_s``, ``sigma_s``
(2023), used for FID and sFID whenever ``mu`` is present (its ``arr_0`` still feeds precision and
recall). Kept per image: pool_3 (2048 float32, needed by IS and precision/recall). The sFID
features only feed a running mean and covariance.

Under ``torchrun`` (an initialised ``torch.distributed`` group) each rank embeds a contiguous
share of the batches and rank 0 gathers them in file order, which the Inception Score's
consecutive splits need; other ranks get ``None`` back.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from admkit.errors import UserError
from admkit.metrics.fid import (
    GaussianStatistics,
    RunningStatistics,
    frechet_distance,
    statistics_of,
)
from admkit.metrics.inception import (
    POOL_FEATURES,
    SPATIAL_FEATURES,
    InceptionV3FID,
    spatial_features,
)
from admkit.metrics.inception_score import class_probabilities, inception_score
from admkit.metrics.precision_recall import NEIGHBOURHOOD_SIZE, precision_recall

FEATURE_BATCH_SIZE = 64  # the evaluator's
STATISTICS_KEYS = {"mu": (POOL_FEATURES,), "sigma": (POOL_FEATURES, POOL_FEATURES)}
SPATIAL_STATISTICS_KEYS = {"mu_s": (SPATIAL_FEATURES,), "sigma_s": (SPATIAL_FEATURES,) * 2}


# ---------------------------------------------------------------------------------------------
# Image sources.


class ImageSource(Protocol):
    """Images [N, H, W, 3] uint8 that can be read in consecutive chunks."""

    def __len__(self) -> int: ...

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]: ...


class ArrayImages:
    """An in-memory uint8 array [N, H, W, 3] as an image source."""

    def __init__(self, images: np.ndarray):
        _check_image_layout(images.dtype, images.shape, "images")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        for begin in range(start, stop, batch_size):
            yield self.images[begin : min(begin + batch_size, stop)]


def _check_image_layout(dtype: np.dtype, shape: tuple, where: str) -> None:
    if dtype != np.uint8:
        raise UserError(f"{where} has dtype {dtype}; expected uint8 images (0-255)")
    if len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"{where} has shape {tuple(shape)}; expected [N, H, W, 3] (NHWC, RGB)")
    if shape[0] == 0:
        raise UserError(f"{where} holds no images")


def _read_npy_header(stream, path: Path) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise UserError(f"{path}: arr_0 uses .npy format {version}; write it with np.savez")


class NpzImages:
    """``arr_0`` of an .npz batch, checked on opening and then read in chunks from the zip."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.in_memory: np.ndarray | None = None
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = archive.namelist()
                if "arr_0.npy" not in names:
                    keys = sorted(name.removesuffix(".npy") for name in names)
                    raise UserError(
                        f"{self.path} has no arr_0 (keys: {', '.join(keys) or 'none'}); "
                        "expected images under arr_0, as np.savez(path, images) writes"
                    )
                self.keys = {name.removesuffix(".npy") for name in names}
                member = archive.getinfo("arr_0.npy")
                with archive.open(member) as stream:
                    shape, fortran_order, dtype = _read_npy_header(stream, self.path)
                    self.data_offset = stream.tell()
                _check_image_layout(dtype, shape, f"{self.path} arr_0")
                self.shape = tuple(shape)
                expected = self.data_offset + math.prod(shape)
                if member.file_size < expected:
                    raise UserError(
                        f"{self.path}: arr_0 is truncated ({member.file_size} of {expected} "
                        "bytes); write the file again"
                    )
                if fortran_order:  # rare; the evaluator falls back to loading it whole, too
                    with archive.open(member) as stream:
                        self.in_memory = np.ascontiguousarray(
                            np.lib.format.read_array(stream, allow_pickle=False)
                        )
        except UserError:
            raise
        except FileNotFoundError:
            raise UserError(f"{self.path}: no such file") from None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
            raise UserError(
                f"{self.path} is not a readable .npz batch (truncated or corrupt: {error})"
            ) from None

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[np.ndarray]:
        if self.in_memory is not None:
            yield from ArrayImages(self.in_memory).batches(start, stop, batch_size)
            return
        image_bytes = math.prod(self.shape[1:])
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as stream:
                stream.seek(self.data_offset + start * image_bytes)
                for begin in range(start, stop, batch_size):
                    count = min(batch_size, stop - begin)
                    data = bytearray(stream.read(count * image_bytes))  # writable for torch
                    if len(data) != count * image_bytes:
                        raise UserError(f"{self.path}: arr_0 ends early; write the file again")
                    yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise UserError(f"{self.path} is corrupt ({error}); write the file again") from None


def read_precomputed_statistics(
    path: str | os.PathLike,
) -> tuple[GaussianStatistics, GaussianStatistics] | None:
    """(pool_3, spatial) statistics stored in a reference batch, or None when it has no ``mu``."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "mu" not in npz.files:
                return None
            arrays = {}
            for key, shape in {**STATISTICS_KEYS, **SPATIAL_STATISTICS_KEYS}.items():
                if key not in npz.files:
                    raise UserError(
                        f"{path} has mu but no {key}; store all of mu, sigma, mu_s, sigma_s"
                    )
                arrays[key] = np.asarray(npz[key], dtype=np.float64)
                if arrays[key].shape != shape:
                    raise UserError(
                        f"{path}: {key} has shape {arrays[key].shape}, expected {shape}"
                    )
    except UserError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as error:
        raise UserError(f"{path}: cannot read its statistics ({error})") from None
    return (
        GaussianStatistics(arrays["mu"], arrays["sigma"]),
        GaussianStatistics(arrays["mu_s"], arrays["sigma_s"]),
    )


def write_reference_batch(
    path: str | os.PathLike,
    images: np.ndarray,
    statistics: tuple[GaussianStatistics, GaussianStatistics] | None = None,
) -> None:
    """Write ``arr_0`` (and ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` when given), atomically."""
    arrays = {"arr_0": images}
    if statistics is not None:
        pool, spatial = statistics
        arrays |= {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as file:  # a file object, so numpy adds no ".npz" to the name
            np.savez(file, **arrays)
        os.replace(partial, path)
    except BaseException:  # Ctrl-C included: leave no half-written file behind
        partial.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Features.


@dataclass
class BatchFeatures:
    """What a batch leaves behind: pool_3 [N, 2048] and the sFID running statistics."""

    pool_3: np.ndarray
    spatial: RunningStatistics

    def statistics(self) -> tuple[GaussianStatistics, GaussianStatistics]:
        return statistics_of(self.pool_3), self.spatial.statistics()


def _sharded() -> bool:
    return dist.is_available() and dist.is_initialized()


def _shard(num_images: int, batch_size: int) -> tuple[int, int]:
    """This rank's contiguous image range [start, stop), in whole batches."""
    if not _sharded():
        return 0, num_images
    num_batches = math.ceil(num_images / batch_size)
    per_rank = math.ceil(num_batches / dist.get_world_size())
    start = min(dist.get_rank() * per_rank * batch_size, num_images)
    return start, min(start + per_rank * batch_size, num_images)


@torch.inference_mode()
def extract_features(
    images: ImageSource,
    model: InceptionV3FID,
    batch_size: int = FEATURE_BATCH_SIZE,
    description: str = "features",
    progress: bool = True,
    shard: bool = True,
) -> BatchFeatures | None:
    """Embed every image; under torch.distributed, rank 0 gets all (in order), others None.

    ``shard=False`` embeds every image in this process, whatever the process group.
    """
    distributed = shard and _sharded()
    start, stop = _shard(len(images), batch_size) if distributed else (0, len(images))
    pool_3 = np.zeros((stop - start, POOL_FEATURES), dtype=np.float32)
    spatial = RunningStatistics(SPATIAL_FEATURES, device=model.fc.weight.device)
    show = progress and (not distributed or dist.get_rank() == 0)
    with tqdm(total=stop - start, desc=description, unit="img", disable=not show) as bar:
        done = 0
        for chunk in images.batches(start, stop, batch_size):
            outputs = model(torch.from_numpy(np.ascontiguousarray(chunk)))
            pool_3[done : done + len(chunk)] = outputs.pool_3.cpu().numpy()
            spatial.update(spatial_features(outputs.mixed_6_conv))
            done += len(chunk)
            bar.update(len(chunk))
    spatial = spatial.to("cpu")
    if not distributed:
        return BatchFeatures(pool_3, spatial)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((pool_3, spatial), gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = RunningStatistics(SPATIAL_FEATURES)
    for _, part in gathered:
        merged.merge(part)
    return BatchFeatures(np.concatenate([part for part, _ in gathered]), merged)


# ---------------------------------------------------------------------------------------------
# The evaluation.


@dataclass(frozen=True)
class EvaluationResult:
    """The five numbers of the evaluator; ``inception_score`` is None without IS weights."""

    inception_score: float | None
    fid: float
    sfid: float
    precision: float
    recall: float
    num_reference: int
    num_samples: int
    reference_statistics: str  # "precomputed" or "arr_0"

    def as_dict(self) -> dict:
        return asdict(self)


def open_batch(path: str | os.PathLike, role: str) -> NpzImages:
    """Open and check a batch; precision and recall need more than k = 3 images in each."""
    images = NpzImages(path)
    if len(images) <= NEIGHBOURHOOD_SIZE:
        raise UserError(
            f"{role} batch {path} holds {len(images)} images; precision and recall need at "
            f"least {NEIGHBOURHOOD_SIZE + 1}"
        )
    return images


def evaluate(
    reference: ImageSource | str | os.PathLike,
    sample: ImageSource | str | os.PathLike,
    model: InceptionV3FID,
    batch_size: int = FEATURE_BATCH_SIZE,
    progress: bool = True,
    precomputed: tuple[GaussianStatistics, GaussianStatistics] | None = None,
) -> EvaluationResult | None:
    """IS, FID, sFID, precision and recall of a sample batch against a reference batch.

    Batches are .npz paths or image sources. For a reference path, its stored statistics are
    used when it has them; for a reference source, pass them as ``precomputed``.
    """
    if not hasattr(reference, "batches"):
        path = reference
        reference = open_batch(path, "reference")
        precomputed = read_precomputed_statistics(path)
    if not hasattr(sample, "batches"):
        sample = open_batch(sample, "sample")
    reference_features = extract_features(reference, model, batch_size, "reference", progress)
    sample_features = extract_features(sample, model, batch_size, "samples", progress)
    if reference_features is None or sample_features is None:
        return None  # not rank 0
    return compare_features(reference_features, sample_features, model, precomputed)


def compare_features(
    reference: BatchFeatures,
    sample: BatchFeatures,
    model: InceptionV3FID,
    precomputed: tuple[GaussianStatistics, GaussianStatistics] | None = None,
) -> EvaluationResult:
    """The five numbers from the two batches' features (``precomputed``: the reference's
    whole-dataset statistics, used for FID and sFID when given)."""
    reference_stats = precomputed if precomputed is not None else reference.statistics()
    sample_stats = sample.statistics()
    score = None
    if model.has_logits:
        score = inception_score(class_probabilities(sample.pool_3, model.fc.weight))
    fid = frechet_distance(sample_stats[0], reference_stats[0])
    sfid = frechet_distance(sample_stats[1], reference_stats[1])
    precision, recall = precision_recall(
        reference.pool_3, sample.pool_3, device=model.fc.weight.device
    )
    return EvaluationResult(
        inception_score=score,
        fid=fid,
        sfid=sfid,
        precision=precision,
        recall=recall,
        num_reference=len(reference.pool_3),
        num_samples=len(sample.pool_3),
        reference_statistics="arr_0" if precomputed is None else "precomputed",
    )


def reference_statistics(
    images: ImageSource, model: InceptionV3FID, batch_size: int = FEATURE_BATCH_SIZE
) -> tuple[GaussianStatistics, GaussianStatistics] | None:
    """(pool_3, spatial) statistics of a batch, to store in a reference file (None off rank 0)."""
    features = extract_features(images, model, batch_size, "statistics")
    return None if features is None else features.statistics()
