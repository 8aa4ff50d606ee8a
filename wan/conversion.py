"""One DiT checkpoint (an official folder or any single file ``wan.weight_formats`` reads) to one
safetensors file in the Comfy-Org layout, tensor by tensor.

The output layout: bare Wan keys. ``fp8``: every block Linear weight (``BLOCK_LINEAR_WEIGHTS``, what
``quantize="fp8"`` quantises at load) as float8_e4m3fn with a 0-d float32 ``<layer>.scale_weight``
and ``<layer>.scale_input`` (1.0: activations are not pre-scaled), the empty float8 ``scaled_fp8``
marker, and every other tensor float16 (ComfyUI's own repackaged files keep these in float16).
``bf16`` / ``fp16``: every tensor in that dtype.

The fp8 weights are the ones a load with ``quantize="fp8"`` (per tensor) computes from the same source
and LoRAs: the source value (float8 sources dequantised), the LoRA merged in float32, quantised with
``wan.fp8.quantize``. A float8 source weight with a per-tensor (or no) scale that no LoRA touches
keeps its bytes and scale; one with per-row scales is requantised per tensor (the layout has one
scale per layer).

Host memory stays about one tensor: each source shard is memory-mapped, each tensor's pages are
released after it is written, and the writer streams (``wan.safetensors_writer``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from wan.checkpoint_layout import TransformerFiles
from wan.checkpoint_reader import MappedSafetensors
from wan.fp8 import FP8, dequantize, quantize
from wan.loading import TensorTransform, kept_fp8
from wan.safetensors_writer import Entry, SafetensorsWriter
from wan.weight_files import materialise
from wan.weight_formats import BLOCK_LINEAR_WEIGHTS, KEPT_FLOAT8, MARKERS, Layout

TARGETS = ("fp8", "bf16", "fp16")
OTHER_DTYPES = {"fp8": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16}
MARKER = next(iter(MARKERS))  # "scaled_fp8"
SCALE_WEIGHT, SCALE_INPUT = ".scale_weight", ".scale_input"


@dataclass(frozen=True)
class ConversionPlan:
    """What is written: the output entries in file order, and the source keys in reading order."""

    target: str
    entries: list[Entry]
    keys: list[str]  # official keys, grouped by shard and in file order within each

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def quantised(target: str, key: str) -> bool:
    """Whether official key ``key`` is written as fp8 (+ scales) for ``target``."""
    return target == "fp8" and BLOCK_LINEAR_WEIGHTS.fullmatch(key) is not None


def plan_conversion(
    layout: Layout, shards: dict[str, Path], files: TransformerFiles, target: str
) -> ConversionPlan:
    """The output entries for ``target`` from the source's layout (headers only)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
    order = {shard: i for i, shard in enumerate(files.shards)}
    keys = sorted(layout.sources, key=lambda k: (order[shards[k]], layout.sources[k].start or 0, k))
    entries = [Entry(MARKER, FP8, (0,))] if target == "fp8" else []
    for key in keys:
        shape = layout.sources[key].shape
        if quantised(target, key):
            base = key.removesuffix(".weight")
            entries += [
                Entry(key, FP8, shape),
                Entry(base + SCALE_WEIGHT, torch.float32, ()),
                Entry(base + SCALE_INPUT, torch.float32, ()),
            ]
        else:
            entries.append(Entry(key, OTHER_DTYPES[target], shape))
    return ConversionPlan(target, entries, keys)


def converted(
    key: str,
    layout: Layout,
    tensor: torch.Tensor,
    scale: torch.Tensor | None,
    target: str,
    transform: TensorTransform | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The output tensors of one source tensor (its official key ``key``)."""
    src = layout.sources[key]
    if not quantised(target, key):
        value = materialise(src, tensor, scale)
        if transform is not None:
            value = transform(key, value)
        yield key, value.to(OTHER_DTYPES[target])
        return
    if src.dtype == KEPT_FLOAT8:  # an fp8 source: bytes kept unless a LoRA changes them
        weight, weight_scale = kept_fp8(key, tensor, scale, transform)
        if weight_scale.numel() > 1:  # per-row scales: one per tensor in this layout
            weight, weight_scale = quantize(dequantize(weight, weight_scale), "tensor")
    else:
        value = materialise(src, tensor, scale)
        weight, weight_scale = quantize(transform(key, value) if transform is not None else value, "tensor")
    base = key.removesuffix(".weight")
    yield key, weight
    yield base + SCALE_WEIGHT, weight_scale.float().reshape(())
    yield base + SCALE_INPUT, torch.ones((), dtype=torch.float32)


def write_conversion(
    file: BinaryIO,
    files: TransformerFiles,
    layout: Layout,
    shards: dict[str, Path],
    plan: ConversionPlan,
    *,
    transform: TensorTransform | None = None,
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write ``plan`` to ``file``, reading the source tensor by tensor. ``on_bytes(n)``: progress."""
    writer = SafetensorsWriter(file, plan.entries, metadata)
    if plan.target == "fp8":
        writer.write(MARKER, torch.empty(0, dtype=FP8))
    by_shard: dict[Path, list[str]] = {}
    for key in plan.keys:
        by_shard.setdefault(shards[key], []).append(key)
    for shard in files.shards:
        with MappedSafetensors(shard) as mapped:
            for key in by_shard.get(shard, []):
                src = layout.sources[key]
                tensor = mapped.tensor(src.key)
                scale = mapped.tensor(src.scale) if src.scale else None
                for name, value in converted(key, layout, tensor, scale, plan.target, transform):
                    writer.write(name, value)
                    if on_bytes is not None:
                        on_bytes(value.numel() * value.element_size())
                mapped.release(src.key)  # keep the process's resident set near one tensor
    writer.close()
