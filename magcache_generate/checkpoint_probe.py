"""What a checkpoint file holds (tensor names, dtypes, shapes), read without reading any tensor data.

Torch-free, so the CLI can check a whole checkpoint folder in well under a second before it imports
torch. Two formats:

* ``.safetensors``: an 8-byte little-endian header length, then a JSON header naming every tensor's
  dtype, shape and byte range. Every range must lie inside the file, so a truncated shard is found here.
* ``torch.save`` archives (``.pth``): a zip file whose ``data.pkl`` pickles the state dict, with each
  tensor's bytes in ``data/<key>``. The pickle is walked by an unpickler that knows only the few
  globals a plain state dict uses (as ``torch.load(weights_only=True)`` does) and builds stand-ins
  instead of tensors; the zip directory gives each storage's stored size, so truncation is found too.

Any problem raises ``ProbeError`` with a one-line reason (the caller adds the path and the fix).
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wan.safetensors_header import HeaderError, is_shape, read_header

ZIP_MAGIC = b"PK\x03\x04"
# torch.save's pre-1.6 format starts with the pickled magic number 0x1950a86a20f9469cfc6c
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

# torch.<Name>Storage (the storage classes torch.save pickles) -> (dtype, bytes per element)
TORCH_STORAGES = {
    "DoubleStorage": ("float64", 8),
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
}


class ProbeError(ValueError):
    """The file is not a readable checkpoint; the message is one line saying why."""


class UnsupportedPickle(ProbeError):
    """The pickle uses a torch global this reader does not model (a newer or rarer save format). Not a
    verdict on the file: ``torch.load(weights_only=True)`` may still read it, so the caller defers."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


TensorTable = dict[str, TensorInfo]


def probe_tensor_file(path: str | Path) -> TensorTable:
    """Tensor name -> dtype and shape for a ``.safetensors`` or ``torch.save`` file, format told by content."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(len(LEGACY_TORCH_MAGIC))
    except OSError as err:
        raise ProbeError(f"cannot be read ({err.strerror or err})") from None
    if size == 0:
        raise ProbeError("is empty (0 bytes): the download did not finish")
    if head.startswith(ZIP_MAGIC):
        return probe_torch_archive(path)
    if head.startswith(LEGACY_TORCH_MAGIC):
        raise ProbeError(
            "is in torch's legacy (pre-1.6) save format, which cannot be memory-mapped; "
            "re-save it with torch.save, or download the official file"
        )
    if len(head) >= 9 and head[8:9] == b"{":
        return probe_safetensors(path)
    raise ProbeError("is neither a torch.save archive nor a safetensors file (corrupt, or another format)")


def probe_safetensors(path: str | Path) -> TensorTable:
    """The JSON header of a safetensors file, checked against the file size; no tensor bytes are read."""
    try:
        header = read_header(path)
    except HeaderError as err:
        raise ProbeError(str(err)) from None
    return {name: TensorInfo(info.dtype, info.shape) for name, info in header.items()}


# ---------------------------------------------------------------------------------------------------
# torch.save zip archives


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    itemsize: int
    numel: int


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *_rest: Any) -> _Tensor:
    if not isinstance(storage, _Storage) or not is_shape(list(shape)) or not isinstance(offset, int):
        raise ProbeError("holds a malformed tensor record in its pickle (corrupt)")
    return _Tensor(storage, offset, tuple(shape), tuple(stride))


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data  # an nn.Parameter saved in a state dict: the tensor is what matters


# The only globals a pickled plain state dict uses (what torch.load(weights_only=True) also allows for it).
PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a plain state dict into stand-ins; refuses every global such a file does not need."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in PICKLE_GLOBALS:
            return PICKLE_GLOBALS[(module, name)]
        if module == "torch" and name in TORCH_STORAGES:
            return name
        if module == "torch" or module.startswith("torch."):
            raise UnsupportedPickle(f"pickles {module}.{name}, which this reader does not model")
        raise ProbeError(f"pickles {module}.{name}, so it is not a plain state dict of tensors")

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type, key, location, numel), as torch.save writes it
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ProbeError("holds a malformed storage record in its pickle (corrupt)")
        if pid[1] not in TORCH_STORAGES:
            raise UnsupportedPickle(f"stores a {pid[1]!r} storage, which this reader does not model")
        dtype, itemsize = TORCH_STORAGES[pid[1]]
        return _Storage(str(pid[2]), dtype, itemsize, int(pid[4]))


def probe_torch_archive(path: str | Path) -> TensorTable:
    """The state dict in a ``torch.save`` zip archive, from its pickle and zip directory only."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ProbeError("is truncated or corrupt: the zip directory at its end is missing") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ProbeError("is a zip file but not a torch.save archive (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            raw = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ProbeError(f"is corrupt: its pickle cannot be read ({err})") from None
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    try:
        obj = _StateDictUnpickler(io.BytesIO(raw)).load()
    except ProbeError:
        raise
    except Exception as err:  # pickle raises many types for damaged data
        raise ProbeError(f"is corrupt: its pickle cannot be read ({type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise ProbeError(f"holds a {type(obj).__name__}, not a state dict of tensors")
    table: TensorTable = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _Tensor):
            raise ProbeError(f"entry {name!r} is not a tensor, so this is not a plain state dict")
        storage = value.storage
        stored = sizes.get(f"{prefix}data/{storage.key}")
        if stored is None:
            raise ProbeError(f"is corrupt: the bytes of tensor {name!r} are missing from the archive")
        if stored < storage.numel * storage.itemsize or storage.numel < _extent(value):
            raise ProbeError(f"is corrupt: tensor {name!r} needs more bytes than the archive stores for it")
        table[name] = TensorInfo(storage.dtype, value.shape)
    return table


def _extent(tensor: _Tensor) -> int:
    """Elements of its storage a strided tensor reaches (offset + the farthest index + 1)."""
    if 0 in tensor.shape:
        return 0
    return tensor.offset + 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride, strict=False))
