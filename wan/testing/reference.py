"""Upstream reference values the runtime's own forms are checked against."""

from __future__ import annotations

import torch

from wan.modules.rope import axis_angles, axis_dims


def rope_table(head_dim: int, max_positions: int = 1024, device: torch.device | str = "cpu") -> torch.Tensor:
    """Upstream's `model.freqs`: complex128 [max_positions, head_dim/2], the three axes concatenated.

    The runtime builds a complex64 table per latent grid instead (`wan.modules.rope.grid_rope`)."""
    parts = [
        torch.polar(torch.ones_like(a), a)
        for a in (axis_angles(max_positions, d, device) for d in axis_dims(head_dim))
    ]
    return torch.cat(parts, dim=1)
