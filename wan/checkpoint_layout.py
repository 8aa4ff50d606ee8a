"""Where the files of an official transformer checkpoint are, checked without reading tensor data.

Torch-free, so the CLI can validate a checkpoint folder before importing torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wan.checkpoint_reader import ReadError, TensorInfo, read_safetensors_header
from wan.errors import CheckpointError

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class TransformerFiles:
    """The files of one transformer checkpoint: its config.json (if any) and its safetensors shards."""

    config: Path | None
    shards: tuple[Path, ...]
    index: Path | None = None


def locate_transformer_files(path: str | Path) -> TransformerFiles:
    """Find config and shards; raise CheckpointError naming what is missing. Reads no tensor data."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: transformer weights must be a .safetensors file or a checkpoint folder"
            )
        config = path.parent / CONFIG_FILE
        return TransformerFiles(config if config.is_file() else None, (path,))
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: transformer checkpoint not found (expected a folder with {CONFIG_FILE})"
        )
    config = path / CONFIG_FILE
    if not config.is_file():
        raise CheckpointError(
            f"{path}: missing {CONFIG_FILE}; is this the right folder (e.g. high_noise_model/)?"
        )
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{index}: unreadable index ({err}); re-download it") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{path / missing[0]}: shard named in {INDEX_FILE} is missing; re-download it"
            )
        return TransformerFiles(config, tuple(path / n for n in names), index)
    single = path / SINGLE_FILE
    if single.is_file():
        return TransformerFiles(config, (single,))
    raise CheckpointError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}; the download looks incomplete")


def read_tensor_table(
    files: TransformerFiles, fix: str = "re-download it"
) -> dict[str, tuple[TensorInfo, Path]]:
    """Key -> (TensorInfo, shard) from the shard headers (no tensor data): a corrupt or truncated shard,
    a tensor in two shards and an index that does not match the shards are CheckpointErrors, each one
    line ending with `fix`."""
    tensors: dict[str, tuple[TensorInfo, Path]] = {}
    for shard in files.shards:
        try:
            header = read_safetensors_header(shard)
        except ReadError as err:
            raise CheckpointError(f"'{shard}' (a transformer shard) {err}; {fix}") from None
        for key, info in header.items():
            if key in tensors:
                raise CheckpointError(
                    f"'{shard}' repeats tensor {key!r} of {tensors[key][1].name}; the folder mixes two "
                    f"downloads, {fix}"
                )
            tensors[key] = (info, shard)
    if files.index is not None:
        try:
            weight_map = json.loads(files.index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"'{files.index}' is not a readable shard index; {fix}") from None
        for key, name in weight_map.items():
            if key not in tensors or tensors[key][1].name != name:
                raise CheckpointError(
                    f"'{files.index.parent / name}' lacks tensor {key!r} that {files.index.name} places "
                    f"there; the shard does not match the index, {fix}"
                )
    return tensors


@dataclass(frozen=True)
class DitDims:
    """A transformer's dimensions as its tensor shapes give them: the one reading of a DiT's shapes."""

    dim: int
    in_dim: int
    patch_size: tuple[int, int, int]
    out_dim: int
    text_dim: int
    ffn_dim: int
    freq_dim: int
    num_layers: int


def dit_dims(shapes: Mapping[str, tuple[int, ...]], where: str | Path) -> DitDims:
    """Read a DiT's dimensions off its tensor shapes (key -> shape); CheckpointError names a missing
    or mis-shaped tensor."""

    def shape(key: str, rank: int) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(
                f"{where}: tensor {key!r} is missing; is this a Wan transformer checkpoint?"
            )
        if len(shapes[key]) != rank:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {list(shapes[key])}; the file is corrupt, re-download it"
            )
        return tuple(shapes[key])

    dim, in_dim, *patch = shape("patch_embedding.weight", 5)
    num_layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")), default=-1)
    out_features = shape("head.head.weight", 2)[0]
    return DitDims(
        dim=dim,
        in_dim=in_dim,
        patch_size=(patch[0], patch[1], patch[2]),
        out_dim=out_features // max(1, math.prod(patch)),
        text_dim=shape("text_embedding.0.weight", 2)[1],
        ffn_dim=shape("blocks.0.ffn.0.weight", 2)[0] if num_layers else 4 * dim,
        freq_dim=shape("time_embedding.0.weight", 2)[1],
        num_layers=num_layers,
    )
