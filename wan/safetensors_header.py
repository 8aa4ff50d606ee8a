"""Read a safetensors file's header (names, dtypes, shapes) and small scalars, without torch.

The format is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets"}, "__metadata__": {...}}`` and the raw tensor bytes. The one reader of that header:
the loader, the LoRA checks and the CLI's pre-load checkpoint probe all use it (the last two before
torch is imported or any weight is read).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b"}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}


class HeaderError(ValueError):
    """The file is not a readable safetensors file; the message says why (without the path)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name: "F32", "BF16", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets of the data in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo, in the header's order, without reading tensor data.

    Strict: every entry must be well formed, lie inside the file and hold exactly the bytes its dtype
    and shape need, so a truncated or corrupt file is found here. Raises HeaderError whose message reads
    after the file's name ("is truncated: ...", "has no valid safetensors header ...").
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError(f"is {size} bytes long, too short for a safetensors file: truncated")
            length = int.from_bytes(head, "little")
            if length > MAX_HEADER_BYTES:
                raise HeaderError("has no valid safetensors header (corrupt, or another format)")
            if 8 + length > size:
                raise HeaderError(
                    f"is truncated: its header needs {8 + length} bytes but the file has {size}"
                )
            raw = f.read(length)
    except OSError as err:
        raise HeaderError(f"cannot be read ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise HeaderError("has an unreadable safetensors header (corrupt)") from None
    if not isinstance(header, dict):
        raise HeaderError("has an unreadable safetensors header (corrupt)")
    base = 8 + length
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        info = _entry(name, entry, base)
        if info.end > size:
            raise HeaderError(
                f"is truncated: tensor {name!r} ends at byte {info.end} but the file has {size}"
            )
        width = DTYPE_BYTES.get(info.dtype)
        if width is not None and info.end - info.start != info.numel * width:
            raise HeaderError(
                f"is corrupt: tensor {name!r} has {info.end - info.start} bytes for shape {list(info.shape)}"
            )
        out[name] = info
    return out


def _entry(name: str, entry: object, base: int) -> TensorInfo:
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
        raise HeaderError(f"has a corrupt safetensors header entry for tensor {name!r}")
    start, end = entry["data_offsets"]
    return TensorInfo(entry["dtype"], tuple(entry["shape"]), base + start, base + end)


def is_shape(value: object) -> bool:
    """A JSON list of non-negative ints (a tensor shape)."""
    return isinstance(value, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    )


def read_scalar(path: str | Path, info: TensorInfo) -> float:
    """The value of a one-element tensor (e.g. a LoRA ``alpha``) as a Python float."""
    if info.numel != 1:
        raise HeaderError(f"expected one value, the tensor has shape {list(info.shape)}")
    with Path(path).open("rb") as f:
        f.seek(info.start)
        data = f.read(info.end - info.start)
    if info.dtype == "BF16" and len(data) == 2:
        return struct.unpack("<f", b"\x00\x00" + data)[0]
    fmt = SCALAR_FORMATS.get(info.dtype)
    if fmt is None or len(data) != struct.calcsize(fmt):
        raise HeaderError(f"cannot read a {info.dtype} scalar")
    return float(struct.unpack(fmt, data)[0])
