"""Tiny LoRA files in every key style the loader recognises, generated for a given checkpoint's shapes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

# official module -> diffusers module, for the modules the tests patch
DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.v": "attn2.to_v",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
MODULES = tuple(DIFFUSERS)
STYLES = ("peft", "peft_prefixed", "kohya", "kohya_flat", "diffusers")


def lowrank_factors(
    shapes: Mapping[str, Sequence[int]],
    modules: Sequence[str],
    *,
    rank: int = 4,
    seed: int = 0,
    blocks: int = 2,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """official module name (blocks.i.<module>) -> (down [rank, in], up [out, rank]), random."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for b in range(blocks):
        for m in modules:
            name = f"blocks.{b}.{m}"
            o, i = shapes[f"{name}.weight"]
            out[name] = (torch.randn(rank, i, generator=gen) * 0.2, torch.randn(o, rank, generator=gen) * 0.2)
    return out


def lora_key(module: str, role: str, style: str) -> str:
    """The file key of `module`'s `role` ("down", "up", "alpha") in `style`."""
    if style in ("peft", "peft_prefixed"):
        name = (
            f"{module}.{'lora_A' if role == 'down' else 'lora_B'}.weight"
            if role != "alpha"
            else f"{module}.alpha"
        )
        return ("diffusion_model." if style == "peft_prefixed" else "") + name
    if style == "kohya":
        suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[role]
        return f"diffusion_model.{module}.{suffix}"
    if style == "kohya_flat":
        suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[role]
        return f"lora_unet_{module.replace('.', '_')}.{suffix}"
    if style == "diffusers":
        block, index, rest = module.split(".", 2)
        suffix = {"down": "lora_A.weight", "up": "lora_B.weight", "alpha": "alpha"}[role]
        return f"transformer.{block}.{index}.{DIFFUSERS[rest]}.{suffix}"
    raise ValueError(style)


def write_lora(
    path: Path,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    style: str = "kohya",
    *,
    alpha: float | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `factors` in `style` (with an `.alpha` per module when given) plus any `extra` tensors."""
    tensors = {}
    for module, (down, up) in factors.items():
        tensors[lora_key(module, "down", style)] = down.to(dtype).contiguous()
        tensors[lora_key(module, "up", style)] = up.to(dtype).contiguous()
        if alpha is not None:
            tensors[lora_key(module, "alpha", style)] = torch.tensor(alpha, dtype=dtype)
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
