"""Finding and reading the FID Inception weights, without executing code from any file.

Lookup order: an explicit path, then ``$ADMKIT_INCEPTION``, then the torch hub cache's
``checkpoints`` folder (where pytorch-fid and torch-fidelity download the same file). Two formats:

- the pytorch-fid / torch-fidelity state dict ``pt_inception-2015-12-05-6726825d.pth``, read with
  ``torch.load(weights_only=True)`` and checked key for key and shape for shape;
- NVIDIA's TorchScript port (StyleGAN2-ADA's ``inception-2015-12-05.pt``), only when the user
  points at it. Its tensors are read out of the archive by an unpickler that builds nothing but
  tensors (no TorchScript is compiled or run) and renamed from TF scopes via ``tf_scope_names``.
  Copies without the ``output`` layer give a network with ``has_logits = False``: FID, sFID,
  precision and recall work, the Inception Score does not.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import Tensor

from admkit.errors import UserError
from admkit.metrics.inception import NUM_CLASSES, InceptionV3FID, tf_scope_names

WEIGHTS_FILE_NAMES = (
    "pt_inception-2015-12-05-6726825d.pth",  # pytorch-fid
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity (same tensors)
)
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
ENV_VAR = "ADMKIT_INCEPTION"


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign or code-carrying file: say which and why
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise UserError(
            f"cannot read Inception weights {path} ({type(error).__name__}: {reason[:120]}); "
            f"expected a state dict saved with torch.save, like {WEIGHTS_FILE_NAMES[0]}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; expected {WEIGHTS_FILE_NAMES[0]}")
    return dict(state)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a TorchScript module while unpickling: keeps its attributes, runs nothing."""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, *_unused) -> Tensor:
    return torch.as_strided(storage, size, stride, offset).clone()


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Reads a TorchScript ``data.pkl``: module objects become attribute bags, storages tensors.

    Any other global the file names is refused, so reading it can call nothing but these.
    """

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        _kind, dtype, key, _location, numel = pid
        data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype)[:numel]


def _named_tensors(node, prefix: str = "") -> dict[str, Tensor]:
    if isinstance(node, Tensor):
        return {prefix: node}
    if isinstance(node, _ScriptObject):
        node = node.state
    found = {}
    if isinstance(node, dict):
        for key, value in node.items():
            found.update(_named_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


def _read_torchscript_tensors(path: Path) -> dict[str, Tensor]:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
            prefix = min(pickles, key=len).rsplit("/", 1)[0]
            return _named_tensors(_TensorOnlyUnpickler(archive, prefix).load())
    except (
        pickle.UnpicklingError,
        KeyError,
        ValueError,
        RuntimeError,
        zipfile.BadZipFile,
    ) as error:
        raise UserError(f"cannot read TorchScript Inception weights {path}: {error}") from error


def _from_tf_names(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """NVIDIA's port (convolutions under TF scope names, batch norm as beta/mean/var) -> our keys.

    Its batch norms have no scale (TF's graph has none), so ``bn.weight`` is 1. Names that do not
    map are kept as they are, so the strict key check reports them.
    """
    by_scope: dict[str, dict[str, Tensor]] = {}
    state: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        module, _, field = name.rpartition(".")
        if module == "output" or module.endswith(".output"):
            state[{"weight": "fc.weight", "bias": "fc.bias"}.get(field, name)] = tensor
        elif "layers." in f".{module}." and field in ("weight", "beta", "mean", "var"):
            # "net.layers.mixed_9.tower_1_mixed_conv" and TF "mixed_9/tower_1/mixed/conv" meet here.
            scope = module.split("layers.", 1)[1].replace(".", "_")
            by_scope.setdefault(scope, {})[field] = tensor
        else:
            state[name] = tensor
    for module, scope in tf_scope_names().items():
        fields = by_scope.pop(scope.replace("/", "_"), None)
        if fields is None:
            continue
        if "weight" in fields:
            state[f"{module}.conv.weight"] = fields["weight"]
        if "beta" in fields:
            state[f"{module}.bn.bias"] = fields["beta"]
            state[f"{module}.bn.weight"] = torch.ones_like(fields["beta"])
        if "mean" in fields:
            state[f"{module}.bn.running_mean"] = fields["mean"]
        if "var" in fields:
            state[f"{module}.bn.running_var"] = fields["var"]
    for scope, fields in by_scope.items():
        state.update({f"layers.{scope}.{field}": tensor for field, tensor in fields.items()})
    if "fc.weight" in state and "fc.bias" not in state:
        state["fc.bias"] = torch.zeros(NUM_CLASSES)  # unused: the IS logits carry no bias
    return state


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file: ``path``, else ``$ADMKIT_INCEPTION``, else the torch hub cache."""
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"--inception_weights {path}: no such file")
        return Path(path)
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        if not Path(from_env).is_file():
            raise UserError(f"${ENV_VAR}={from_env}: no such file; fix or unset the variable")
        return Path(from_env)
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHTS_FILE_NAMES:
        if (checkpoints / name).is_file():
            return checkpoints / name
    raise UserError(
        "no FID Inception weights found (looked at --inception_weights, "
        f"${ENV_VAR} and {checkpoints / WEIGHTS_FILE_NAMES[0]}); download {WEIGHTS_URL} "
        "and pass --inception_weights PATH or put it in that folder"
    )


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionV3FID:
    """The FID Inception network with the weights found by :func:`find_inception_weights`.

    Accepts the pytorch-fid / torch-fidelity state dict (read with ``weights_only=True``) and,
    when the user points at one, NVIDIA's TorchScript port (StyleGAN2-ADA's
    ``inception-2015-12-05.pt``): its tensors are read out of the archive by an unpickler that
    builds nothing but tensors, so no TorchScript is compiled or run. Files of that port without
    the ``output`` layer give ``has_logits = False`` (no Inception Score).
    """
    weights_path = find_inception_weights(path)
    if _is_torchscript(weights_path):
        state_dict = _from_tf_names(_read_torchscript_tensors(weights_path))
    else:
        state_dict = _read_state_dict(weights_path)
    has_logits = "fc.weight" in state_dict
    model = InceptionV3FID()
    expected = model.state_dict()
    # Older checkpoints omit num_batches_tracked; it plays no part in eval-mode batch norm.
    optional = {key for key in expected if key.endswith("num_batches_tracked")}
    if not has_logits:
        optional |= {"fc.weight", "fc.bias"}
    missing = sorted(set(expected) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(
        key
        for key in set(state_dict) & set(expected)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or wrong_shape:
        details = "; ".join(
            f"{label} {keys[:3]}{' …' if len(keys) > 3 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if keys
        )
        raise UserError(
            f"{weights_path} is not an FID Inception weights file ({details}); "
            f"expected the pytorch-fid layout of {WEIGHTS_FILE_NAMES[0]}"
        )
    model.load_state_dict(state_dict, strict=False)
    model.has_logits = has_logits
    return model.to(device)
