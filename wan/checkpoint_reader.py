"""The one reader of checkpoint files: what a file holds (tensor names, dtypes, shapes), and its tensors.

Two formats, told by content, not by name:

* ``.safetensors``: an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
  shape and byte range, then the raw bytes. Every range must lie inside the file and hold exactly the
  bytes its dtype and shape need, so a truncated or corrupt file is found from the header alone.
* ``torch.save`` archives (``.pth``): a zip file whose ``data.pkl`` pickles the state dict, each
  storage's bytes in ``data/<key>``. The pickle is walked by an unpickler that knows only the globals
  a plain state dict uses (as ``torch.load(weights_only=True)`` allows) and builds stand-ins instead
  of tensors; the zip directory gives each storage's stored size, so truncation is found too.

Reading a table imports no torch, so the CLI refuses a bad checkpoint within a second, before torch
loads. ``open_tensors`` (imports torch) then memory-maps the file for the loaders. Dtypes are named as
torch names them ("float32", "bfloat16", "float8_e4m3fn"). Problems raise ``ReadError``: one line
saying why, which reads after the file's name (the caller adds the path and the fix).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import torch

# Threads that cast tensors while loading; more than the cores buys nothing (the casts are memory-bound)
LOAD_THREADS = max(1, min(8, os.cpu_count() or 1))
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
ZIP_MAGIC = b"PK\x03\x04"
# torch.save's pre-1.6 format starts with the pickled magic number 0x1950a86a20f9469cfc6c
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

# safetensors dtype name -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
# torch.<Name>Storage (the storage classes torch.save pickles) -> (torch dtype name, bytes per element)
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
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})
SCALAR_FORMATS = {"float64": "<d", "float32": "<f", "float16": "<e", "int64": "<q", "int32": "<i"}
SCALAR_FORMATS |= {"int16": "<h", "int8": "<b"}


class ReadError(ValueError):
    """The file is not a readable checkpoint; the message is one line saying why (without the path)."""


class UnsupportedPickle(ReadError):
    """The pickle uses a torch global this reader does not model (a newer or rarer save format). Not a
    verdict on the file: ``torch.load(weights_only=True)`` may still read it (``read_table_with_torch``)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: torch dtype name, shape, and (safetensors) its absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int | None = field(default=None, compare=False)
    end: int | None = field(default=None, compare=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


TensorTable = dict[str, TensorInfo]


def read_table(path: str | Path) -> TensorTable:
    """Tensor name -> TensorInfo of a ``.safetensors`` or ``torch.save`` file; reads no tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(len(LEGACY_TORCH_MAGIC))
    except OSError as err:
        raise ReadError(f"cannot be read ({err.strerror or err})") from None
    if size == 0:
        raise ReadError("is empty (0 bytes): the download did not finish")
    if head.startswith(ZIP_MAGIC):
        return read_torch_archive(path)
    if head.startswith(LEGACY_TORCH_MAGIC):
        raise ReadError(
            "is in torch's legacy (pre-1.6) save format, which cannot be memory-mapped; "
            "re-save it with torch.save, or download the official file"
        )
    if len(head) >= 9 and head[8:9] == b"{":
        return read_safetensors_header(path)
    raise ReadError("is neither a torch.save archive nor a safetensors file (corrupt, or another format)")


def is_safetensors(path: str | Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then the JSON header."""
    with Path(path).open("rb") as f:
        return f.read(9)[8:] == b"{"


# ---------------------------------------------------------------------------------------------------
# safetensors


def read_safetensors_header(path: str | Path) -> TensorTable:
    """The JSON header of a safetensors file, in the header's order, checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ReadError(f"is {size} bytes long, too short for a safetensors file: truncated")
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER_BYTES:
                raise ReadError("has no valid safetensors header (corrupt, or another format)")
            if 8 + length > size:
                raise ReadError(f"is truncated: its header needs {8 + length} bytes but the file has {size}")
            raw = f.read(length)
    except OSError as err:
        raise ReadError(f"cannot be read ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ReadError("has an unreadable safetensors header (corrupt)") from None
    if not isinstance(header, dict):
        raise ReadError("has an unreadable safetensors header (corrupt)")
    base = 8 + length
    table: TensorTable = {}
    for name, entry in header.items():
        if name != "__metadata__":
            table[name] = _entry(name, entry, base, size)
    return table


def _entry(name: str, entry: object, base: int, size: int) -> TensorInfo:
    ok = (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and is_shape(entry.get("shape"))
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry["data_offsets"])
        and entry["data_offsets"][0] <= entry["data_offsets"][1]
    )
    if not ok:
        raise ReadError(f"has a corrupt safetensors header entry for tensor {name!r}")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise ReadError(f"has tensor {name!r} of unsupported dtype {entry['dtype']!r}")
    dtype, width = SAFETENSORS_DTYPES[entry["dtype"]]
    start, end = (base + offset for offset in entry["data_offsets"])
    info = TensorInfo(dtype, tuple(entry["shape"]), start, end)
    if end > size:
        raise ReadError(f"is truncated: tensor {name!r} ends at byte {end} but the file has {size}")
    if end - start != info.numel * width:
        raise ReadError(f"is corrupt: tensor {name!r} has {end - start} bytes for shape {list(info.shape)}")
    return info


def is_shape(value: object) -> bool:
    """A list of non-negative ints (a tensor shape)."""
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


def read_scalar(path: str | Path, info: TensorInfo) -> float:
    """The value of a one-element safetensors tensor (e.g. a LoRA ``alpha``) as a Python float."""
    if info.numel != 1:
        raise ReadError(f"expected one value, the tensor has shape {list(info.shape)}")
    if info.start is None or info.end is None:
        raise ReadError("holds the value in an archive; only safetensors scalars are read directly")
    with Path(path).open("rb") as f:
        f.seek(info.start)
        data = f.read(info.end - info.start)
    if info.dtype == "bfloat16" and len(data) == 2:
        return struct.unpack("<f", b"\x00\x00" + data)[0]
    fmt = SCALAR_FORMATS.get(info.dtype)
    if fmt is None or len(data) != struct.calcsize(fmt):
        raise ReadError(f"cannot read a {info.dtype} scalar")
    return float(struct.unpack(fmt, data)[0])


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
        raise ReadError("holds a malformed tensor record in its pickle (corrupt)")
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
        raise ReadError(f"pickles {module}.{name}, so it is not a plain state dict of tensors")

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type, key, location, numel), as torch.save writes it
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ReadError("holds a malformed storage record in its pickle (corrupt)")
        if pid[1] not in TORCH_STORAGES:
            raise UnsupportedPickle(f"stores a {pid[1]!r} storage, which this reader does not model")
        dtype, itemsize = TORCH_STORAGES[pid[1]]
        return _Storage(str(pid[2]), dtype, itemsize, int(pid[4]))


def read_torch_archive(path: str | Path) -> TensorTable:
    """The state dict in a ``torch.save`` zip archive, from its pickle and zip directory only."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ReadError("is truncated or corrupt: the zip directory at its end is missing") from None
    except OSError as err:
        raise ReadError(f"cannot be read ({err.strerror or err})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ReadError("is a zip file but not a torch.save archive (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            raw = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ReadError(f"is corrupt: its pickle cannot be read ({err})") from None
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    try:
        obj = _StateDictUnpickler(io.BytesIO(raw)).load()
    except ReadError:
        raise
    except Exception as err:  # pickle raises many types for damaged data
        raise ReadError(f"is corrupt: its pickle cannot be read ({type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise ReadError(f"holds a {type(obj).__name__}, not a state dict of tensors")
    table: TensorTable = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _Tensor):
            raise ReadError(f"entry {name!r} is not a tensor, so this is not a plain state dict")
        storage = value.storage
        stored = sizes.get(f"{prefix}data/{storage.key}")
        if stored is None:
            raise ReadError(f"is corrupt: the bytes of tensor {name!r} are missing from the archive")
        if stored < storage.numel * storage.itemsize or storage.numel < _extent(value):
            raise ReadError(f"is corrupt: tensor {name!r} needs more bytes than the archive stores for it")
        table[name] = TensorInfo(storage.dtype, value.shape)
    return table


def _extent(tensor: _Tensor) -> int:
    """Elements of its storage a strided tensor reaches (offset + the farthest index + 1)."""
    if 0 in tensor.shape:
        return 0
    return tensor.offset + 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride, strict=False))


# ---------------------------------------------------------------------------------------------------
# What a table is: one rule per model, shared by the pre-load checks and the loaders

VAE_MARKER_KEYS = ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight")
T5_MARKER_KEYS = (
    "token_embedding.weight",
    "blocks.0.attn.q.weight",
    "blocks.0.pos_embedding.embedding.weight",
)
T5_NAME = "the umT5 text encoder (models_t5_umt5-xxl-enc-bf16.pth)"


def vae_kind(keys: Mapping[str, object]) -> str:
    """'2.2' when the encoder has the Wan2.2 nested down-sampling stages, else '2.1'."""
    return "2.2" if any(k.startswith("encoder.downsamples.0.downsamples.") for k in keys) else "2.1"


def identify(keys: Mapping[str, object]) -> str | None:
    """Which Wan model a tensor table (or state dict) belongs to, told by a few characteristic keys."""
    if "patch_embedding.weight" in keys:
        return "a Wan diffusion transformer (DiT)"
    if "token_embedding.weight" in keys or "blocks.0.attn.q.weight" in keys:
        return T5_NAME
    if all(k in keys for k in VAE_MARKER_KEYS):
        return f"a Wan{vae_kind(keys)} VAE (Wan{vae_kind(keys)}_VAE.pth)"
    if "shared.weight" in keys or any(k.startswith("encoder.block.") for k in keys):
        return "the umT5 text encoder (Hugging Face key names)"
    return None


# ---------------------------------------------------------------------------------------------------
# Tensors, memory-mapped (imports torch)


def read_table_with_torch(path: str | Path) -> TensorTable:
    """The table of a ``.pth`` whose pickle ``read_torch_archive`` does not model, read the way the
    loaders open it: weights_only, memory-mapped, so no tensor data is read."""
    with open_tensors(path) as (table, _):
        return table


@contextlib.contextmanager
def open_tensors(path: str | Path) -> Iterator[tuple[TensorTable, Callable[[str], torch.Tensor]]]:
    """(table, get) of a file, memory-mapped: ``get(name)`` returns that tensor backed by the page cache
    (safetensors: a copy-on-write map of the file; ``.pth``: ``torch.load(mmap=True)``).

    The torch-free table is read first, so a truncated or corrupt file raises ``ReadError`` before any
    map; any other failure (out of memory, a permission problem) propagates as itself."""
    import torch

    path = Path(path)
    try:
        table = read_table(path)
    except UnsupportedPickle:
        table = None
    if table is not None and is_safetensors(path):
        with MappedSafetensors(path, table) as mapped:
            yield table, mapped.tensor
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: not a plain state dict
        raise ReadError(f"holds objects other than tensors ({_first_line(err)})") from None
    except (RuntimeError, EOFError, ValueError) as err:
        if table is not None:
            raise  # the reader found the file sound: this is no damaged download
        raise ReadError(f"cannot be read ({_first_line(err)})") from None
    if table is None:
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ReadError("does not hold a plain state dict of tensors")
        table = {k: TensorInfo(str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in state.items()}
    yield table, state.__getitem__


class MappedSafetensors:
    """A safetensors file mapped copy-on-write: ``tensor(name)`` views the page cache (no read, no copy).

    The views stay valid after ``close`` (the map lives while a view does); callers that keep a tensor
    beyond the load copy it (a cast does)."""

    def __init__(self, path: str | Path, table: TensorTable | None = None):
        import mmap

        self.path = Path(path)
        self.table = table if table is not None else read_safetensors_header(self.path)
        with self.path.open("rb") as f:
            size = f.seek(0, 2)
            # ACCESS_COPY: a writable (private) map, which torch.frombuffer wants; nothing is written
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        info = self.table[name]
        dtype = getattr(torch, info.dtype)
        if info.numel == 0 or self._map is None:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=info.end - info.start, offset=info.start)
        return flat.view(dtype).reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop a tensor's mapped pages from this process (they stay in the page cache): keeps the
        resident set near what the model holds. Views of it re-read the file if touched again."""
        import mmap

        info = self.table[name]
        page = mmap.PAGESIZE
        start, end = -(-info.start // page) * page, info.end // page * page
        if self._map is not None and end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self._map = None  # unmapped when the last view is gone

    def __enter__(self) -> MappedSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


@contextlib.contextmanager
def load_pool(threads: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool of load threads that, when the caller fails or is interrupted (Ctrl-C), drops the work
    still queued instead of finishing it: an interrupted load ends after the tensors in flight."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=threads or LOAD_THREADS, thread_name_prefix="load")
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def map_threaded(fn: Callable[[Any], Any], items: list[Any], threads: int | None = None) -> list[Any]:
    """``[fn(x) for x in items]`` on a few threads, in order: for per-tensor casts, which release the GIL
    (the cores share the work while the page cache feeds it). The first error propagates."""
    threads = threads or LOAD_THREADS
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with load_pool(threads) as pool:
        return list(pool.map(fn, items))
