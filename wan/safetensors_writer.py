"""Writing a safetensors file one tensor at a time, so the host holds one tensor, not the whole model.

The format is an 8-byte little-endian header length, a JSON header giving every tensor's dtype, shape
and byte range (relative to the end of the header), then the raw little-endian bytes. The writer is
given every tensor's name, dtype and shape up front, writes the header, then takes the tensors in
that order and checks each against its entry. The header is padded with spaces to a multiple of 8
bytes (what the safetensors library writes, so the data is aligned when the file is mapped).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import BinaryIO

import torch

from wan.checkpoint_reader import SAFETENSORS_DTYPES

HEADER_ALIGNMENT = 8
# torch dtype name -> safetensors dtype name
SAFETENSORS_NAMES = {torch_name: st_name for st_name, (torch_name, _) in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file to write: its name, torch dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and the padded JSON header of a file holding ``entries`` in this order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in entries:
        name = SAFETENSORS_NAMES.get(str(entry.dtype).removeprefix("torch."))
        if name is None:
            raise ValueError(f"tensor {entry.name!r}: dtype {entry.dtype} has no safetensors name")
        header[entry.name] = {
            "dtype": name,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    return len(raw).to_bytes(8, "little") + raw


def file_size(entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
    return len(header_bytes(entries, metadata)) + sum(e.nbytes for e in entries)


class SafetensorsWriter:
    """Writes ``entries`` to an open binary file: the header at once, then ``write`` per tensor, in order."""

    def __init__(self, file: BinaryIO, entries: list[Entry], metadata: dict[str, str] | None = None):
        if len({e.name for e in entries}) != len(entries):
            raise ValueError("two tensors of the same name")
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this machine is not")
        self.file, self.entries = file, entries
        self.file.write(header_bytes(entries, metadata))
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the next entry's."""
        if self._next >= len(self.entries):
            raise ValueError(f"tensor {name!r} is one more than the header lists")
        entry = self.entries[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (entry.name, entry.dtype, entry.shape):
            raise ValueError(
                f"tensor {name!r} {tensor.dtype} {list(tensor.shape)} is not the next entry "
                f"({entry.name!r} {entry.dtype} {list(entry.shape)})"
            )
        if entry.nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self.file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        """Check that every entry was written (a short file is never left looking complete)."""
        if self._next != len(self.entries):
            missing = self.entries[self._next].name
            raise ValueError(f"{len(self.entries) - self._next} tensor(s) not written, from {missing!r}")
        self.file.flush()
