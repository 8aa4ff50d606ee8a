"""Reading tensors through a ``wan.weight_formats.Layout``: official names in, dequantised tensors out.

Every tensor a loader receives passes ``materialise``: a float8 weight arrives with its scale as a
``ScaledFloat8`` pair, the one place where a future fp8-resident Linear can keep the pair instead of
dequantising. Today the pair becomes ``weight.float() * scale`` (the value the publishing tool
computes), converted by the loader to the run's dtype like any other tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from wan.weight_formats import Layout, TensorEntry, WeightSource

# (shard, file key, read) as yielded by the transformer loader's shard iterator
ShardItem = tuple[Path, str, Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class ScaledFloat8:
    """A float8 weight and its scale as stored: 0-d / one element (per tensor) or one per row."""

    weight: torch.Tensor
    scale: torch.Tensor

    def dequantise(self) -> torch.Tensor:
        """float32 ``weight * scale``, a per-row scale broadcast over its row."""
        scale = self.scale.float()
        if scale.numel() != 1:
            scale = scale.reshape(-1, *([1] * (self.weight.dim() - 1)))
        else:
            scale = scale.reshape(())
        return self.weight.float() * scale


def materialise(source: WeightSource, tensor: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The tensor the model gets for one official key. A float8 weight without a scale is its own value
    (float32, exact); with one, the dequantised product."""
    if scale is not None:
        return ScaledFloat8(tensor, scale).dequantise()
    if source.float8:
        return tensor.float()
    return tensor


def stream_official(layout: Layout, items: Callable[[], Iterable[ShardItem]]) -> Iterator[ShardItem]:
    """(shard, official key, read) for every tensor the layout loads, in file order.

    ``items()`` starts one pass over the file(s); a float8 layout takes two: the scales first (a few
    bytes each; a scale may sit after its weight in the file), then the weights."""
    by_file_key = {src.key: (key, src) for key, src in layout.sources.items()}
    scales: dict[str, torch.Tensor] = {}
    if layout.scale_keys:
        wanted = set(layout.scale_keys)
        for _, key, read in items():
            if key in wanted:
                scales[key] = read()
    for shard, key, read in items():
        if key not in by_file_key:
            continue  # markers, input scales, weight scales: recognised, not loaded
        official, src = by_file_key[key]

        def read_official(read=read, src=src) -> torch.Tensor:
            return materialise(src, read(), scales.get(src.scale) if src.scale else None)

        yield shard, official, read_official


def official_getter(layout: Layout, get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """For random-access files: official key -> tensor (renamed and dequantised)."""

    def get_official(key: str) -> torch.Tensor:
        src = layout.sources[key]
        return materialise(src, get(src.key), get(src.scale) if src.scale else None)

    return get_official


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F16", "F8_E4M3", ...), as the format layer compares them."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def tensor_table(state: dict[str, torch.Tensor]) -> dict[str, TensorEntry]:
    """The format layer's view of an in-memory state dict."""
    return {key: TensorEntry(dtype_name(v.dtype), tuple(v.shape)) for key, v in state.items()}


def official_state_dict(layout: Layout, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An in-memory state dict under official names, float8 weights dequantised (the dict itself when
    the layout is already the official one)."""
    if layout.identity:
        return state
    get = official_getter(layout, state.__getitem__)
    return {key: get(key) for key in layout.sources}
