"""3-axis rotary position embedding of the Wan DiT (frame, height, width).

Upstream builds its table in float64 (complex128) and rotates q and k in float64 on every call. Here
the angles are computed once per latent grid in float64 (as upstream), and the rotations
cos + i sin are stored as one complex64 table per grid and device; the rotation itself runs in
float32 (complex64). The result differs from upstream's float64 rotation by float32 rounding (~1e-7 relative), far
inside the golden tolerance, and no float64/complex128 temporaries of q/k exist any more (they were
the largest temporaries of a block).
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class RopeTable:
    """Per-token rotations of one latent grid: cos + i sin, complex64 [F*H*W, head_dim/2]."""

    rotation: torch.Tensor

    @property
    def cos(self) -> torch.Tensor:
        return self.rotation.real

    @property
    def sin(self) -> torch.Tensor:
        return self.rotation.imag

    @property
    def num_tokens(self) -> int:
        return self.rotation.shape[0]


@lru_cache(maxsize=4)  # one table per latent grid and device: every step, branch, block and expert reuses it
def grid_rope(head_dim: int, grid: tuple[int, int, int], device: torch.device | str = "cpu") -> RopeTable:
    """The complex64 rotation table of a (F, H, W) token grid, tokens in (f, h, w) row-major order.

    Built on `device` (no host-device copy), once per grid: tokens x head_dim/2 x 8 bytes
    (39 MB at 1280x720x81).
    """
    with torch.inference_mode(False), torch.no_grad():  # a cached table must not be an inference tensor
        angles = _grid_angles(head_dim, grid, torch.device(device))
        return RopeTable(rotation=torch.complex(torch.cos(angles).float(), torch.sin(angles).float()))


def _grid_angles(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """float64 [F*H*W, head_dim/2]: [frame angles at f | height angles at h | width angles at w]."""
    f, h, w = grid
    at, ah, aw = (axis_angles(n, d, device) for n, d in zip(grid, axis_dims(head_dim), strict=True))
    per_token = torch.cat(
        [
            at[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return per_token.reshape(f * h * w, -1)


def apply_rope(x: torch.Tensor, rope: RopeTable, *, start: int = 0) -> torch.Tensor:
    """Rotate adjacent channel pairs (2k, 2k+1) of x [B, L, heads, head_dim] (upstream's interleaved
    RoPE); a new float32 tensor, as upstream's rotation returns float32.

    Tokens of x are rows `start .. start + L` of the table (x may be a token chunk). Each channel pair
    is a complex64 number times the table's cos + i sin (upstream: complex128), in place on one
    float32 copy of x: three contiguous kernels (the copy, the complex product, the caller's cast)
    where the real form needs six over stride-2 halves (by their call counts, the H100 profile's slow non-vectorised float32 kernels were mostly
    those)."""
    length, d = x.shape[1], x.shape[-1]
    turn = rope.rotation[start : start + length, None, :]
    rotated = x.to(torch.float32, copy=True)  # the one float32 temporary: rotated in place
    torch.view_as_complex(rotated.unflatten(-1, (d // 2, 2))).mul_(turn)
    return rotated
