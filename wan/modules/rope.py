"""3-axis rotary position embedding of the Wan DiT (frame, height, width).

Upstream builds its table in float64 (complex128) and rotates q and k in float64 on every call. Here
the angles are computed once per latent grid in float64 (as upstream), and their cos/sin are stored
as a float32 table; the rotation itself runs in float32 (complex64), a bounded pass of tokens at a
time. The result differs from upstream's float64 rotation by float32 rounding (~1e-7 relative), far
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


def rope_table(head_dim: int, max_positions: int = 1024, device: torch.device | str = "cpu") -> torch.Tensor:
    """Upstream's `model.freqs`: complex128 [max_positions, head_dim/2], the three axes concatenated.

    Kept as the reference the float32 table is checked against (tests); the model does not use it.
    """
    parts = [
        torch.polar(torch.ones_like(a), a)
        for a in (axis_angles(max_positions, d, device) for d in axis_dims(head_dim))
    ]
    return torch.cat(parts, dim=1)


@dataclass(frozen=True)
class RopeTable:
    """Per-token rotations of one latent grid: cos and sin, float32 [F*H*W, head_dim/2] each."""

    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.cos.shape[0]


@lru_cache(maxsize=4)  # one table per latent grid and device: every step, branch and expert reuses it
def grid_rope(head_dim: int, grid: tuple[int, int, int], device: torch.device | str = "cpu") -> RopeTable:
    """The float32 cos/sin table of a (F, H, W) token grid, tokens in (f, h, w) row-major order.

    Built on `device` (no host-device copy), once per grid: 2 x tokens x head_dim/2 x 4 bytes
    (39 MB at 1280x720x81).
    """
    with torch.inference_mode(False), torch.no_grad():  # a cached table must not be an inference tensor
        angles = _grid_angles(head_dim, grid, torch.device(device))
        return RopeTable(cos=torch.cos(angles).float(), sin=torch.sin(angles).float())


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


# Tokens rotated per pass: bounds the float32 temporaries of a rotation (the upcast copy and the
# complex product: 2 x this x width x 4 bytes) whatever the sequence length. The rotation is
# element-wise, so the split changes no value.
ROTATION_TOKENS = 4096


def apply_rope(
    x: torch.Tensor,
    rope: RopeTable,
    *,
    start: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate adjacent channel pairs (2k, 2k+1) of x [B, L, heads, head_dim] (upstream's interleaved RoPE).

    Tokens of x are rows `start .. start + L` of the table (x may be a token chunk). The rotation is
    computed in float32 and written into `out` (same shape as x, any float dtype; `out=x` rotates in
    place, which is safe: both halves of a pair are read before either is written). Without `out` a
    new float32 tensor is returned, as upstream's rotation returns float32.
    """
    if torch.compiler.is_compiling():  # functional: the compiler fuses it (and rejects `out=` views)
        return _rotated(x, rope, start).to(torch.float32 if out is None else out.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    length = x.shape[1]
    for s in range(0, length, ROTATION_TOKENS):
        e = min(s + ROTATION_TOKENS, length)
        _rotate(x[:, s:e], rope, start + s, out[:, s:e])
    return out


def _rotate(x: torch.Tensor, rope: RopeTable, start: int, out: torch.Tensor) -> None:
    """One pass: each channel pair as a complex64 number times (cos + i sin), as upstream rotates
    (in complex128). Three contiguous kernels (upcast, complex product, write back) where the real
    form needs six over stride-2 halves (by their call counts, the H100 profile's slow non-vectorised
    float32 kernels were mostly these: about 7 of a block's 82 ms at 832x480x81)."""
    length, d = x.shape[1], x.shape[-1]
    turn = torch.complex(rope.cos[start : start + length], rope.sin[start : start + length])[:, None, :]
    pairs = torch.view_as_complex(x.float().unflatten(-1, (d // 2, 2)))  # x.float(): no copy if float32
    out.copy_(torch.view_as_real(pairs * turn).flatten(-2))  # the product is new: out may be x


def _rotated(x: torch.Tensor, rope: RopeTable, start: int) -> torch.Tensor:
    """The rotation of `_rotate` in real float32 arithmetic, for torch.compile (which fuses it; its
    complex support is partial)."""
    length, d = x.shape[1], x.shape[-1]
    cos = rope.cos[start : start + length, None, :]
    sin = rope.sin[start : start + length, None, :]
    pairs = x.unflatten(-1, (d // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
