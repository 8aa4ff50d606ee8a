"""Read a safetensors file's header (names, dtypes, shapes) and small scalars, without torch.

The format is an 8-byte little-endian header length, a JSON header ``{name: {"dtype", "shape",
"data_offsets"}, "__metadata__": {...}}`` and the raw tensor bytes. The CLI uses this to check LoRA
files against a checkpoint's parameter shapes before torch is imported or any weight is read.
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
    """Tensor name -> TensorInfo, in the header's order; raises HeaderError for anything malformed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HeaderError("too short to be a safetensors file")
            length = int.from_bytes(head, "little")
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise HeaderError("no safetensors header at its start")
            raw = f.read(length)
    except OSError as err:
        raise HeaderError(f"cannot be read ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise HeaderError("its safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise HeaderError("its safetensors header is not a JSON object")
    base = 8 + length
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in entry["data_offsets"])
            info = TensorInfo(
                str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), base + start, base + end
            )
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"its header entry for {name!r} is malformed") from None
        if info.end > size or info.start > info.end:
            raise HeaderError(f"tensor {name!r} lies outside the file (truncated download?)")
        out[name] = info
    return out


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
