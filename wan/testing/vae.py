"""Random-weight Wan VAE state dicts with the official keys, at any width.

Scales follow the golden checkpoints: conv/linear weights ~ N(0, 1/fan_in) (output heads x0.3 so the
decoded pixels mostly stay inside [-1, 1]), biases ~ N(0, 0.1^2), norm gains ~ 1 + N(0, 0.1^2).
"""

from __future__ import annotations

import math

import torch

from wan.vae import VaeConfig

HEAD_KEYS = ("encoder.head.2.weight", "decoder.head.2.weight")


def tiny_vae_state_dict(
    kind: str,
    dim: int = 4,
    dec_dim: int | None = None,
    z_dim: int | None = None,
    num_res_blocks: int = 2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A float32 state dict for a Wan ``kind`` ("2.1" | "2.2") VAE; real widths: 96, or 160/256.

    ``z_dim`` defaults to the official 16 (2.1) or 48 (2.2); ``dec_dim`` to ``dim`` (2.1 has no
    separate decoder width).
    """
    if kind not in ("2.1", "2.2"):
        raise ValueError(f"unknown VAE kind {kind!r}; expected '2.1' or '2.2'")
    if kind == "2.1" and dec_dim not in (None, dim):
        raise ValueError("the Wan2.1 VAE has one width: leave dec_dim unset or equal to dim")
    config = VaeConfig(kind, dim, dec_dim or dim, z_dim or (16 if kind == "2.1" else 48), num_res_blocks)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in config.build().state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=generator)
        if key.endswith(".gamma"):
            state[key] = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            state[key] = 0.1 * noise
        else:
            fan_in = math.prod(shape[1:])
            state[key] = noise * (0.3 if key in HEAD_KEYS else 1.0) / math.sqrt(fan_in)
    return state
