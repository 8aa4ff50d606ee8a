"""3-axis rotary position embedding of the Wan DiT (frame, height, width), in float64 as upstream."""

from __future__ import annotations

from functools import lru_cache

import torch

THETA = 10000.0


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channels given to (frame, height, width): 44/42/42 for head_dim 128 (upstream's split)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def axis_angles(positions: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Angles pos * theta^(-2j/dim) for pos < positions, j < dim/2: float64 [positions, dim/2]."""
    pos = torch.arange(positions, device=device)
    inv_freq = 1.0 / torch.pow(THETA, torch.arange(0, dim, 2, device=device).to(torch.float64).div(dim))
    return torch.outer(pos, inv_freq)


def rope_table(head_dim: int, max_positions: int = 1024, device: torch.device | str = "cpu") -> torch.Tensor:
    """Upstream's `model.freqs`: complex128 [max_positions, head_dim/2], the three axes concatenated."""
    parts = [
        torch.polar(torch.ones_like(a), a)
        for a in (axis_angles(max_positions, d, device) for d in axis_dims(head_dim))
    ]
    return torch.cat(parts, dim=1)


@lru_cache(maxsize=4)  # one table per latent grid: every step and branch of a run reuses it
def grid_freqs(head_dim: int, grid: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-token rotations for a (F, H, W) token grid in (f, h, w) row-major order: complex128 [F*H*W, head_dim/2]."""
    with torch.inference_mode(False), torch.no_grad():  # a cached table must not be an inference tensor
        return _grid_freqs(head_dim, grid, device)


def _grid_freqs(head_dim: int, grid: tuple[int, int, int], device: torch.device | str) -> torch.Tensor:
    f, h, w = grid
    ft, fh, fw = (
        torch.polar(torch.ones_like(a), a)
        for a in (axis_angles(n, d, device) for n, d in zip(grid, axis_dims(head_dim), strict=True))
    )
    per_token = torch.cat(
        [
            ft[:, None, None, :].expand(f, h, w, -1),
            fh[None, :, None, :].expand(f, h, w, -1),
            fw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return per_token.reshape(f * h * w, -1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2k, 2k+1) of x [B, L, heads, head_dim] by freqs [L, head_dim/2].

    Upstream rotates in float64 (autocast off) and returns float32, whatever the input dtype.
    """
    b, length, n, d = x.shape
    pairs = torch.view_as_complex(x.to(torch.float64).reshape(b, length, n, d // 2, 2))
    rotated = torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3)
    return rotated.float()
