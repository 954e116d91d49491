"""Image datasets in guided-diffusion's conventions: image folders and ``.npz`` arrays.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose items are
``(image [3, S, S] float32 in [-1, 1], label int)``. An item key is either an index ``i`` or a
pair ``(i, flip)``: the pair form lets the batch sampler (``admkit.data.batches``) decide the
horizontal flip outside the loading workers, so a batch never depends on which worker loaded it.

Preprocessing follows the original's ``image_datasets.py`` (reference §7): PIL ``convert("RGB")``,
then BOX halving while the short side is at least 2S, then BICUBIC to short side S, then a
centre S×S crop at offsets ((H−S)//2, (W−S)//2); pixels become ``x / 127.5 − 1``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from admkit.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp")

# What PIL raises for a file that is not an image, is cut short, or cannot be read.
_UNREADABLE = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively, in the original's order.

    Entries are sorted by name within each directory and visited depth first, so a
    sub-directory's files sit where the sub-directory sorts (``a.png, b/c.png, d.png``).
    """
    found = []
    for name in sorted(os.listdir(folder)):
        path = Path(folder, name)
        if path.is_dir():
            found.extend(list_image_files(path))
        elif path.is_file() and "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS:
            found.append(path)
    return found


def class_name_of(path: str | os.PathLike) -> str:
    """The class of an image file: its base name up to the first ``_`` (the whole name if none).

    ``n01440764_2708.JPEG`` → ``n01440764``; ``cat.png`` → ``cat.png`` (as the original does).
    """
    return Path(path).name.split("_", 1)[0]


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize so the short side is ``image_size`` and crop the centre square, as the original.

    Returns uint8 ``[S, S, C]``. Repeated 2× BOX reductions before the single BICUBIC step
    anti-alias large images cheaply; images smaller than S are upscaled by the BICUBIC step.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    # Python's round (half to even) on purpose: it is what the original uses.
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[S, S, 3]`` → float32 ``[3, S, S]`` in [−1, 1]."""
    # A copy: arrays viewed from PIL images are read-only, and tensors should own their memory.
    image = torch.from_numpy(np.array(array)).permute(2, 0, 1)
    return image.to(torch.float32) / 127.5 - 1.0


def check_image_size(image_size: int) -> None:
    """Raise a ``UserError`` unless ``image_size`` is a positive int."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise UserError(f"image_size must be a positive whole number of pixels, got {image_size!r}")


class ImageDataset(Dataset):
    """Shared item protocol: subclasses load ``(image [3, S, S], label)`` unflipped by index.

    Attributes: ``image_size`` (S), ``labels`` (one int per item), ``class_names`` (index →
    name), ``num_classes`` (``len(class_names)``; 0 when the data has no labels, and then every
    label is −1), ``random_flip`` (whether batch samplers should draw horizontal flips),
    ``source`` (where the data came from, for logs and messages).
    """

    image_size: int
    class_names: list[str]
    random_flip: bool
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """The unflipped item ``index``: image ``[3, S, S]`` float32 in [−1, 1] and its label."""
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, flip = key
        else:
            index = key
            # Plain indexing behaves like the original's loader (a coin per item); batch
            # samplers pass the flip explicitly instead, to stay reproducible.
            flip = self.random_flip and bool(torch.rand(()) < 0.5)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, label = self.load(int(index) % len(self))
        if flip:
            image = image.flip(-1)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source!r}, {len(self)} images, {self.image_size}px, "
            f"{self.num_classes} classes)"
        )


class ImageFolderDataset(ImageDataset):
    """Every image under a folder (recursively), labelled by file-name prefix.

    Labels index the sorted set of class names (``class_name_of``) over the readable files, so
    they are the same on every rank. Files whose header cannot be read are skipped at once with
    a warning; a file that fails later, while decoding, is replaced by the next readable one
    (also with a warning naming it) so that a long run does not stop on one bad file.

    Images smaller than ``image_size`` are upscaled with bicubic, as in the original, after one
    warning; ``strict_size=True`` makes them an error instead.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        image_size: int,
        *,
        random_flip: bool = False,
        strict_size: bool = False,
    ) -> None:
        check_image_size(image_size)
        folder = Path(folder)
        if not folder.exists():
            raise UserError(f"data folder {folder} does not exist: check the --data path")
        if not folder.is_dir():
            raise UserError(f"data {folder} is not a folder, an .npz file or 'digits'")
        candidates = list_image_files(folder)
        if not candidates:
            raise UserError(
                f"data folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "point --data at a folder of image files"
            )
        self.paths: list[Path] = []
        smaller = []
        for path in candidates:
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except _UNREADABLE as error:
                warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=2)
                continue
            self.paths.append(path)
            if min(width, height) < image_size:
                smaller.append((path, width, height))
        if not self.paths:
            raise UserError(f"none of the {len(candidates)} images in {folder} could be read")
        if smaller:
            path, width, height = smaller[0]
            message = (
                f"{len(smaller)} image(s) in {folder} are smaller than image_size {image_size}, "
                f"e.g. {path} ({width}x{height})"
            )
            if strict_size:
                raise UserError(f"{message}: use larger images or a smaller --image_size")
            warnings.warn(f"{message}; they are upscaled with bicubic", stacklevel=2)

        names = [class_name_of(path) for path in self.paths]
        self.class_names = sorted(set(names))
        index_of = {name: i for i, name in enumerate(self.class_names)}
        self.labels = [index_of[name] for name in names]
        self.image_size = image_size
        self.random_flip = random_flip
        self.source = str(folder)
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            image.load()
            image = image.convert("RGB")
        return _to_tensor(center_crop_arr(image, self.image_size))

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        # Walk forward from `index` to the first file that decodes; the substitute is the same
        # every time, so batches stay deterministic even with a bad file in the set.
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._failed:
                continue
            try:
                return self._decode(candidate), self.labels[candidate]
            except _UNREADABLE as error:
                self._failed.add(candidate)
                warnings.warn(
                    f"skipping unreadable image {self.paths[candidate]}: {error}", stacklevel=2
                )
        raise UserError(f"none of the images in {self.source} could be decoded")


def read_npz_images(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` (uint8 ``[N, H, W, 3]``) and ``arr_1`` (int64 ``[N]`` or None) of an ``.npz``.

    Grey ``[N, H, W]`` or ``[N, H, W, 1]`` images are widened to three equal channels.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"npz file {path} does not exist: check the path")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "arr_0" not in archive.files:
                raise UserError(
                    f"{path} has no arr_0 (it has {', '.join(archive.files) or 'nothing'}): "
                    "save images with np.savez(path, images_uint8_nhwc[, labels])"
                )
            images = archive["arr_0"]
            labels = archive["arr_1"] if "arr_1" in archive.files else None
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise UserError(f"cannot read {path} (truncated or corrupt .npz?): {error}") from None

    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(
            f"{path}: arr_0 must be uint8 [N, H, W, 3] images, got {images.dtype} "
            f"{list(images.shape)}"
        )
    if images.shape[0] == 0:
        raise UserError(f"{path}: arr_0 holds no images")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if labels is not None:
        if labels.shape != (images.shape[0],) or labels.dtype.kind not in "iu":
            raise UserError(
                f"{path}: arr_1 must be {images.shape[0]} integer labels, got {labels.dtype} "
                f"{list(labels.shape)}"
            )
        if labels.min() < 0:
            raise UserError(f"{path}: arr_1 has negative label {labels.min()}; labels start at 0")
        labels = labels.astype(np.int64)
    return images, labels


class NpzDataset(ImageDataset):
    """Images from an ``.npz`` in guided-diffusion's sample layout (``arr_0``, optional ``arr_1``).

    Images of another size than ``image_size`` are resized and centre-cropped like image files.
    Without ``arr_1`` every label is −1 and ``num_classes`` is 0; with it, the classes are
    ``"0" … str(max label)``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_size: int,
        *,
        random_flip: bool = False,
        strict_size: bool = False,
    ) -> None:
        check_image_size(image_size)
        self.images, labels = read_npz_images(path)
        height, width = self.images.shape[1:3]
        if min(height, width) < image_size:
            message = (
                f"images in {path} ({width}x{height}) are smaller than image_size {image_size}"
            )
            if strict_size:
                raise UserError(f"{message}: use larger images or a smaller --image_size")
            warnings.warn(f"{message}; they are upscaled with bicubic", stacklevel=2)
        if labels is None:
            self.labels = np.full(len(self.images), -1, dtype=np.int64)
            self.class_names = []
        else:
            self.labels = labels
            self.class_names = [str(i) for i in range(int(labels.max()) + 1)]
        self.image_size = image_size
        self.random_flip = random_flip
        self.source = str(path)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        array = self.images[index]
        if array.shape[:2] != (self.image_size, self.image_size):
            array = center_crop_arr(Image.fromarray(array), self.image_size)
        return _to_tensor(array), int(self.labels[index])
