"""Reading tensors through a ``wan.weight_formats.Layout``: official names in, dequantised tensors out.

Every tensor a loader receives passes ``materialise``: a float8 weight arrives with its scale as a
``ScaledFloat8`` pair and becomes ``weight.float() * scale`` (the value the publishing tool
computes), converted by the loader to the run's dtype like any other tensor. The one exception is
a DiT file whose block Linears are all float8_e4m3fn: ``wan.loading`` keeps those pairs as stored,
in fp8 Linears (``Layout.block_fp8``, ``WeightStorage.keeping_file_fp8``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from wan.fp8 import dequantize
from wan.weight_formats import Layout, WeightSource


@dataclass(frozen=True)
class ScaledFloat8:
    """A float8 weight and its scale as stored: 0-d / one element (per tensor) or one per row."""

    weight: torch.Tensor
    scale: torch.Tensor

    def dequantise(self) -> torch.Tensor:
        """float32 ``weight * scale``, a per-row scale broadcast over its row (``wan.fp8``'s rule)."""
        return dequantize(self.weight, self.scale)


def materialise(source: WeightSource, tensor: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The tensor the model gets for one official key. A float8 weight without a scale is its own value
    (float32, exact); with one, the dequantised product."""
    if scale is not None:
        return ScaledFloat8(tensor, scale).dequantise()
    if source.float8:
        return tensor.float()
    return tensor


def official_getter(layout: Layout, get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """For random-access files: official key -> tensor (renamed and dequantised)."""

    def get_official(key: str) -> torch.Tensor:
        src = layout.sources[key]
        return materialise(src, get(src.key), get(src.scale) if src.scale else None)

    return get_official
