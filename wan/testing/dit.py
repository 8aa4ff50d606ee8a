"""Tiny random Wan transformers written in the official diffusers-folder layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from wan.loading import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from wan.modules.transformer import TransformerConfig, WanTransformer

IN_OUT = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}


def tiny_transformer_config(
    model_type: str = "t2v",
    *,
    dim: int = 32,
    num_heads: int = 2,
    num_layers: int = 2,
    ffn_dim: int = 64,
    text_len: int = 16,
    text_dim: int = 24,
    freq_dim: int = 256,
) -> TransformerConfig:
    in_dim, out_dim = IN_OUT[model_type]
    return TransformerConfig(
        model_type=model_type,
        in_dim=in_dim,
        out_dim=out_dim,
        dim=dim,
        ffn_dim=ffn_dim,
        num_heads=num_heads,
        num_layers=num_layers,
        text_len=text_len,
        text_dim=text_dim,
        freq_dim=freq_dim,
    )


def random_transformer_state_dict(cfg: TransformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with unit-ish activations. Unlike upstream's init, the head is not zero,
    so outputs depend on every parameter and parity checks are not vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanTransformer(cfg).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        if key.endswith("modulation"):
            value = torch.randn(shape, generator=gen) * 0.1
        elif key.endswith(".bias"):
            value = torch.randn(shape, generator=gen) * 0.02
        elif len(shape) == 1:  # norm weights
            value = 1.0 + torch.randn(shape, generator=gen) * 0.1
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        state[key] = value.contiguous()
    return state


def official_config_json(cfg: TransformerConfig) -> dict:
    """config.json as upstream writes it: no text_dim/patch_size/qk_norm/... (ignore_for_config)."""
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "dim": cfg.dim,
        "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim,
        "model_type": cfg.model_type,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "out_dim": cfg.out_dim,
        "text_len": cfg.text_len,
    }


def write_transformer_folder(
    folder: str | Path,
    cfg: TransformerConfig,
    *,
    seed: int = 0,
    shards: int = 3,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config.json + `diffusion_pytorch_model-0000i-of-0000n.safetensors` + index (shards > 1),
    or a single `diffusion_pytorch_model.safetensors` (shards == 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else random_transformer_state_dict(cfg, seed)
    (folder / CONFIG_FILE).write_text(json.dumps(official_config_json(cfg), indent=2))
    if shards == 1:
        save_file(state, str(folder / SINGLE_FILE))
        return folder
    keys = list(state)
    per_shard = math.ceil(len(keys) / shards)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return folder
