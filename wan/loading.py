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
from concurrent.futures import ThreadPoolExecutor
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
from wan.checkpoint_reader import LOAD_THREADS, MappedSafetensors, TensorInfo
from wan.errors import CheckpointError
from wan.modules.fp8_linear import quantize_model, quantize_options
from wan.modules.transformer import TransformerConfig, WanTransformer
from wan.placement import Placement, WeightSink
from wan.weight_storage import WeightStorage

MODEL_TYPES = {16: "t2v", 36: "i2v", 48: "ti2v"}  # in_dim -> model_type, when config.json is absent
# (key, tensor as read) -> tensor to convert and place; applied before placement (LoRA merge).
TensorTransform = Callable[[str, torch.Tensor], torch.Tensor]


def read_shapes(files: TransformerFiles) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Key -> (shape, shard) from the shard headers; duplicates and index mismatches are errors."""
    return {key: (info.shape, shard) for key, (info, shard) in read_tensor_table(files).items()}


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
    tables: dict[Path, dict[str, TensorInfo]],
    sink: WeightSink,
    transform: TensorTransform | None,
    on_shard: Callable[[Path], None] | None,
) -> None:
    """Every tensor of every shard: viewed in the file's memory map, transformed, cast and placed by a
    few threads (the casts release the GIL, so the cores share the work while the page cache feeds it)."""
    cpu = sink.placement.device.type == "cpu"

    def place(mapped: MappedSafetensors, key: str) -> None:
        source = mapped.tensor(key)  # a view of the page cache: nothing read yet
        tensor = transform(key, source) if transform is not None else source
        if tensor is source and cpu and tensor.dtype == sink.storage.dtype_of(key):
            tensor = tensor.clone()  # the model must own its memory, not the file's map
        sink.put(key, tensor)  # convert to its storage dtype and place (device, or a host buffer)
        mapped.release(key)  # drop the mapped pages from this process (they stay in the page cache)

    with ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="load") as pool:
        for shard in files.shards:
            table = tables[shard]
            with MappedSafetensors(shard, table) as mapped:
                keys = sorted(table, key=lambda k: table[k].start)  # file order: sequential reads
                for done in [pool.submit(place, mapped, key) for key in keys]:
                    done.result()
            if on_shard is not None:
                on_shard(shard)


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
) -> WanTransformer:
    """Load a Wan 2.2 transformer (folder with config.json + shards, or one .safetensors file).

    Each tensor goes read -> transform -> convert and place. `storage` gives each parameter's dtype
    (default: every parameter in `dtype`; `WeightStorage.for_run` stores the autocast-consumed
    Linears in bf16 for float32 runs on CUDA; with `quantize="fp8"` the block Linears' weights are
    quantised as they arrive, after `transform`). `transform(key, tensor)` rewrites each
    tensor as it is read (e.g. `wan.lora.LoraMerge`, in float32: rounded once, here, afterwards);
    `placement` (default: everything on `device`)
    says which blocks stream from host memory; those land straight in their host buffers, so the host
    never holds a second copy. `on_shard(path)` is called after each shard is loaded (progress
    reporting); `on_warning` receives a one-line warning (page-locking failed).
    """
    path = Path(path)
    files = locate_transformer_files(path)
    table = read_tensor_table(files)
    shapes = {key: (info.shape, shard) for key, (info, shard) in table.items()}
    tables: dict[Path, dict[str, TensorInfo]] = {shard: {} for shard in files.shards}
    for key, (info, shard) in table.items():
        tables[shard][key] = info
    raw = _read_json(files.config) if files.config else {}
    cfg = config_from_checkpoint(raw, shapes, path)
    with torch.device("meta"):
        model = WanTransformer(cfg)
    check_state_shapes(model, shapes, path)
    storage = storage or WeightStorage(dtype)
    if storage.quantize is not None:  # the block Linears become fp8 layers, filled as tensors arrive
        quantize_model(model, **quantize_options(storage))
    sink = WeightSink(model, storage, placement or Placement(torch.device(device)), on_warning)
    _place_all(files, tables, sink, transform, on_shard)
    return sink.finish().eval().requires_grad_(False)
