"""Transformer checkpoint I/O: official diffusers-style folders or single safetensors files.

The model is built on the meta device and filled tensor by tensor: each shard is memory-mapped, and a
few threads cast each tensor from the page cache straight into its place (the device, or its
streamed block's host buffer), so the load runs at the speed of the disk and the cores, and the
host holds one copy of the weights, in the run's dtype (upstream materialises the float32 model
first: ~57 GB per A14B expert). The mapped pages are file-backed page cache, which the kernel can
drop under pressure; each tensor's pages are released from the process once it is placed.
Every check (files, keys, shapes) runs on the headers before any tensor data is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from wan.checkpoint_layout import (  # noqa: F401 - re-exported
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    TransformerFiles,
    dit_dims,
    locate_transformer_files,
    read_tensor_table,
)
from wan.checkpoint_reader import MappedSafetensors, load_pool
from wan.errors import CheckpointError
from wan.fp8 import dequantize, granularity_of, quantize
from wan.modules.fp8_linear import quantize_model, quantize_options
from wan.modules.transformer import TransformerConfig, WanTransformer
from wan.placement import Placement, WeightSink, set_tensor
from wan.weight_files import materialise
from wan.weight_formats import FormatError, Layout, dit_layout_of_shards
from wan.weight_storage import WeightStorage

MODEL_TYPES = {16: "t2v", 36: "i2v", 48: "ti2v"}  # in_dim -> model_type, when config.json is absent
# (key, tensor as read) -> tensor to convert and place; applied before placement (LoRA merge).
TensorTransform = Callable[[str, torch.Tensor], torch.Tensor]


def read_layout(files: TransformerFiles) -> tuple[Layout, dict[str, Path]]:
    """The checkpoint's tensors under their official names (a single file's prefix stripped, float8
    weights paired with their scales) and the shard holding each, from the shard headers."""
    try:
        return dit_layout_of_shards(read_tensor_table(files))
    except FormatError as err:
        raise CheckpointError(f"{files.shards[0]} {err}") from None


def read_shapes(files: TransformerFiles) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Official key -> (shape, shard) from the shard headers; duplicates and index mismatches are errors."""
    layout, shards = read_layout(files)
    return {key: (src.shape, shards[key]) for key, src in layout.sources.items()}


def config_from_checkpoint(
    raw: dict, shapes: dict[str, tuple[tuple[int, ...], Path]], where: Path
) -> TransformerConfig:
    """Official config.json values, plus what it omits (text_dim, patch_size: upstream's
    ignore_for_config) read off tensor shapes; with no config.json everything comes from shapes."""

    dims = dit_dims({key: shape for key, (shape, _) in shapes.items()}, where)
    defaults = {
        "model_type": MODEL_TYPES.get(dims.in_dim, "t2v"),
        "in_dim": dims.in_dim,
        "dim": dims.dim,
        "ffn_dim": dims.ffn_dim,
        "freq_dim": dims.freq_dim,
        "num_layers": dims.num_layers,
        "out_dim": dims.out_dim,
        "text_len": 512,
        "eps": 1e-6,
    }
    merged = {**defaults, **{k: raw[k] for k in defaults if k in raw}}
    num_heads = raw.get("num_heads", max(1, dims.dim // 128))
    for key in ("dim", "in_dim", "num_layers"):
        if merged[key] != defaults[key]:
            raise CheckpointError(
                f"{where}: config.json says {key}={merged[key]} but the weights have {defaults[key]}"
            )
    return TransformerConfig(
        model_type=merged["model_type"],
        in_dim=merged["in_dim"],
        out_dim=merged["out_dim"],
        dim=merged["dim"],
        ffn_dim=merged["ffn_dim"],
        num_heads=num_heads,
        num_layers=merged["num_layers"],
        text_len=merged["text_len"],
        text_dim=dims.text_dim,
        freq_dim=merged["freq_dim"],
        patch_size=dims.patch_size,
        eps=merged["eps"],
    )


def read_transformer_config(path: str | Path) -> TransformerConfig:
    """The architecture of a transformer checkpoint, from its headers only (no tensor data)."""
    files = locate_transformer_files(path)
    raw = _read_json(files.config) if files.config else {}
    return config_from_checkpoint(raw, read_shapes(files), Path(path))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err}); re-download it") from None


def check_state_shapes(
    model: nn.Module, shapes: dict[str, tuple[tuple[int, ...], Path]], where: Path
) -> None:
    """Strict key and shape check: missing, unexpected and mis-shaped tensors are errors."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        key = unexpected[0]
        raise CheckpointError(
            f"{shapes[key][1]}: unexpected tensor {key!r} ({len(unexpected)} unexpected in all)"
        )
    for key, shape in expected.items():
        if shapes[key][0] != shape:
            raise CheckpointError(
                f"{shapes[key][1]}: tensor {key!r} has shape {list(shapes[key][0])}, expected {list(shape)}"
            )


def _place_all(
    files: TransformerFiles,
    layout: Layout,
    shards: dict[str, Path],
    sink: WeightSink,
    transform: TensorTransform | None,
    on_shard: Callable[[Path], None] | None,
) -> None:
    """Every tensor of every shard: viewed in the file's memory map, renamed and (float8) dequantised
    (``wan.weight_files``), transformed, cast and placed by a few threads (the casts release the GIL,
    so the cores share the work while the page cache feeds it)."""
    cpu = sink.placement.device.type == "cpu"

    keep_fp8 = sink.storage.from_file  # the file's fp8 block Linears stay fp8 (`WeightStorage.from_file`)

    def place(mapped: MappedSafetensors, key: str) -> None:
        src = layout.sources[key]
        source = mapped.tensor(src.key)  # a view of the page cache: nothing read yet
        scale = mapped.tensor(src.scale) if src.scale else None
        if keep_fp8 and sink.storage.quantizes(key):
            weight, weight_scale = kept_fp8(key, source, scale, transform)
            sink.put_quantized(key, weight, weight_scale)  # copied: the model owns its bytes
            mapped.release(src.key)
            return
        value = materialise(src, source, scale)  # official value: float8 dequantised
        tensor = transform(key, value) if transform is not None else value
        if tensor is source and cpu and tensor.dtype == sink.storage.dtype_of(key) and not sink.in_place:
            tensor = tensor.clone()  # the model must own its memory, not the file's map
        sink.put(key, tensor)  # convert to its storage dtype and place (device, or a host buffer)
        mapped.release(src.key)  # drop the mapped pages from this process (they stay in the page cache)

    by_shard: dict[Path, list[str]] = {shard: [] for shard in files.shards}
    for key, shard in shards.items():
        by_shard[shard].append(key)
    with load_pool() as pool:
        for shard in files.shards:
            with MappedSafetensors(shard) as mapped:
                keys = sorted(by_shard[shard], key=lambda k: layout.sources[k].start or 0)  # sequential reads
                for done in [pool.submit(place, mapped, key) for key in keys]:
                    done.result()
            if on_shard is not None:
                on_shard(shard)


def kept_fp8(
    key: str, weight: torch.Tensor, scale: torch.Tensor | None, transform: TensorTransform | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float8 block Linear weight of a file as the fp8 layer holds it: the stored bytes and their
    float32 scale (1 for a file without scales). A LoRA touching it merges through dequantise ->
    float32 merge -> requantise (`LoraMerge.merge_quantized`); an untouched weight keeps its bytes."""
    scale = scale.float() if scale is not None else torch.ones((), dtype=torch.float32)
    if transform is None:
        return weight, scale
    merge_quantized = getattr(transform, "merge_quantized", None)
    if merge_quantized is not None:
        return merge_quantized(key, weight, scale)
    value = dequantize(weight, scale)
    merged = transform(key, value)
    return (weight, scale) if merged is value else quantize(merged, granularity_of(scale))


def load_transformer(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    on_shard: Callable[[Path], None] | None = None,
    transform: TensorTransform | None = None,
    placement: Placement | None = None,
    on_warning: Callable[[str], None] | None = None,
    storage: WeightStorage | None = None,
    shard: Callable[[nn.Module], None] | None = None,
) -> WanTransformer:
    """Load a Wan 2.2 transformer (folder with config.json + shards, or one .safetensors file).

    Each tensor goes read -> transform -> convert and place. `storage` gives each parameter's dtype
    (default: every parameter in `dtype`; `WeightStorage.for_run` stores the autocast-consumed
    Linears in bf16 for float32 runs on CUDA; with `quantize="fp8"` the block Linears' weights are
    quantised as they arrive, after `transform`). `transform(key, tensor)` rewrites each
    tensor as it is read (e.g. `wan.lora.LoraMerge`, in float32: rounded once, here, afterwards).
    A file whose block Linears are all float8_e4m3fn keeps them fp8 (as `quantize="fp8"` would, with
    the file's bytes and scales: `WeightStorage.keeping_file_fp8`); its other float8 tensors are
    dequantised to the run's dtype;
    `placement` (default: everything on `device`)
    says which blocks stream from host memory; those land straight in their host buffers, so the host
    never holds a second copy. `on_shard(path)` is called after each shard is loaded (progress
    reporting); `on_warning` receives a one-line warning (page-locking failed). `shard(model)` splits
    the weights over ranks (`wan.distributed.fsdp.shard_weights`): it runs on the meta model, whose
    parameters already have their storage dtypes, and each rank then allocates and fills only its part.
    """
    path = Path(path)
    files = locate_transformer_files(path)
    layout, shards = read_layout(files)  # official names (wan.weight_formats)
    shapes = {key: (src.shape, shards[key]) for key, src in layout.sources.items()}
    raw = _read_json(files.config) if files.config else {}
    cfg = config_from_checkpoint(raw, shapes, path)
    with torch.device("meta"):
        model = WanTransformer(cfg)
    check_state_shapes(model, shapes, path)
    storage = storage or WeightStorage(dtype)
    if layout.block_fp8 is not None:  # an fp8 file: its block Linears load as fp8 layers, bytes kept
        storage = storage.keeping_file_fp8(layout.block_fp8)
    if storage.quantize is not None:  # the block Linears become fp8 layers, filled as tensors arrive
        quantize_model(model, **quantize_options(storage))
    placement = placement or Placement(torch.device(device))
    if shard is not None:
        if placement.resident_blocks is not None:
            raise ValueError("a model sharded over ranks keeps every block: it cannot stream blocks too")
        for key, param in list(model.named_parameters()):  # the stored dtypes, before the split
            dtype = torch.float32 if storage.widened(key) else storage.dtype_of(key)
            set_tensor(model, key, torch.empty_like(param, dtype=dtype))
        shard(model)
        model.to_empty(device=placement.device)
    sink = WeightSink(model, storage, placement, on_warning, in_place=shard is not None)
    _place_all(files, layout, shards, sink, transform, on_shard)
    return sink.finish().eval().requires_grad_(False)
