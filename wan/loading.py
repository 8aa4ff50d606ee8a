"""Transformer checkpoint I/O: official diffusers-style folders or single safetensors files.

The model is built on the meta device and filled tensor by tensor, each read with plain file reads
(no memory map) and converted to the target dtype on arrival, so peak host memory stays near one
copy of the model's host-resident part plus one tensor (upstream materialises the float32 model
first: ~57 GB per A14B expert).
Every check (files, keys, shapes) runs on the headers before any tensor data is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from wan.checkpoint_layout import (  # noqa: F401 - re-exported
    CONFIG_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    TransformerFiles,
    locate_transformer_files,
    read_tensor_table,
)
from wan.errors import CheckpointError
from wan.modules.fp8_linear import quantize_model, quantize_options
from wan.modules.transformer import TransformerConfig, WanTransformer
from wan.placement import Placement, WeightSink
from wan.safetensors_header import HeaderError, read_header
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

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(
                f"{where}: tensor {key!r} is missing; is this a Wan transformer checkpoint?"
            )
        return shapes[key][0]

    dim, in_dim, *patch = shape("patch_embedding.weight")
    num_layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")), default=-1)
    out_features = shape("head.head.weight")[0]
    patch_size = tuple(patch)
    defaults = {
        "model_type": MODEL_TYPES.get(in_dim, "t2v"),
        "in_dim": in_dim,
        "dim": dim,
        "ffn_dim": shape("blocks.0.ffn.0.weight")[0] if num_layers else 4 * dim,
        "freq_dim": shape("time_embedding.0.weight")[1],
        "num_layers": num_layers,
        "out_dim": out_features // max(1, patch[0] * patch[1] * patch[2]),
        "text_len": 512,
        "eps": 1e-6,
    }
    merged = {**defaults, **{k: raw[k] for k in defaults if k in raw}}
    num_heads = raw.get("num_heads", max(1, dim // 128))
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
        text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=merged["freq_dim"],
        patch_size=patch_size,
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


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _read_into(fh, target: torch.Tensor, shard: Path, key: str) -> None:
    """Fill `target` (uint8) from the file's current position; raw reads may return short counts."""
    view = memoryview(target.numpy()).cast("B")
    filled = 0
    while filled < len(view):
        got = fh.readinto(view[filled:])
        if not got:
            raise CheckpointError(
                f"{shard}: tensor {key!r} could not be read (the file ends early); re-download it"
            )
        filled += got


def iter_shard_tensors(files: TransformerFiles) -> Iterator[tuple[Path, str, Callable[[], torch.Tensor]]]:
    """(shard, key, read) for every tensor, in file order; `read()` returns that tensor alone.

    Tensors are read with plain file reads, not a memory map: a mapped shard counts in the process's
    resident set as it is touched (up to ~9.9 GB per official A14B shard on top of the model)."""
    for shard in files.shards:
        try:
            header = read_header(shard)
        except HeaderError as err:
            raise CheckpointError(f"{shard} {err}; re-download it") from None
        with open(shard, "rb", buffering=0) as fh:
            for key, info in sorted(header.items(), key=lambda item: item[1].start):

                def read(fh=fh, key=key, info=info, shard=shard) -> torch.Tensor:
                    dtype = SAFETENSORS_DTYPES.get(info.dtype)
                    if dtype is None:
                        raise CheckpointError(f"{shard}: tensor {key!r} has unsupported dtype {info.dtype}")
                    raw = torch.empty(info.end - info.start, dtype=torch.uint8)
                    fh.seek(info.start)
                    _read_into(fh, raw, shard, key)
                    return raw.view(dtype).reshape(info.shape)

                yield shard, key, read


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
    shapes = read_shapes(files)
    raw = _read_json(files.config) if files.config else {}
    cfg = config_from_checkpoint(raw, shapes, path)
    with torch.device("meta"):
        model = WanTransformer(cfg)
    check_state_shapes(model, shapes, path)
    storage = storage or WeightStorage(dtype)
    if storage.quantize is not None:  # the block Linears become fp8 layers, filled as tensors arrive
        quantize_model(model, **quantize_options(storage))
    sink = WeightSink(model, storage, placement or Placement(torch.device(device)), on_warning)
    current = None
    for shard, key, read in iter_shard_tensors(files):
        if current is not None and shard != current and on_shard:
            on_shard(current)
        current = shard
        try:
            tensor = read()  # 1. read one tensor from the file
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"{shard}: tensor {key!r} could not be read ({err}); re-download it"
            ) from None
        if transform is not None:
            tensor = transform(key, tensor)  # e.g. a LoRA merged into this weight, in float32
        sink.put(key, tensor)  # convert to its storage dtype and place (device, or a host buffer)
    if current is not None and on_shard:
        on_shard(current)
    return sink.finish().eval().requires_grad_(False)
