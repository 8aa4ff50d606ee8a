"""The Wan 2.2 diffusion transformer (upstream `WanModel`), one implementation for t2v, i2v and ti2v.

Parameter names equal the official state-dict keys, so official checkpoints load without remapping.
Precision follows upstream's bf16 regime when the parameters are bf16: sinusoid and RoPE in float64,
time MLPs, modulation, norms, gated residual adds and the head in float32, other Linears in the
parameter dtype. With float32 parameters everything is float32 (the goldens' regime).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from wan.modules.rope import apply_rope, grid_freqs


@dataclass(frozen=True)
class TransformerConfig:
    model_type: str  # "t2v" | "i2v" | "ti2v"
    in_dim: int
    out_dim: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


class ResidualCacheLike(Protocol):
    """What the transformer needs from a step-skipping cache: run(h, blocks) -> h_out."""

    def run(self, h: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


class BlockSource(Protocol):
    """Where the block weights come from during a forward (memory placement, e.g. streamed blocks).

    `iter_blocks(blocks)` yields every block in order, each ready on the compute device when yielded.
    """

    def iter_blocks(self, blocks: nn.ModuleList) -> Iterator[nn.Module]: ...


# ----------------------------------------------------------------------------------------------------
# Small numerics helpers
# ----------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep features in float64, cos half first (upstream order), frequencies 10000^(-i/half)."""
    half = dim // 2
    pos = t.to(torch.float64)
    angles = torch.outer(pos, torch.pow(10000, -torch.arange(half, device=t.device).to(pos).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in float32 whatever its parameter dtype (upstream's autocast(float32) regions)."""
    bias = layer.bias.float() if layer.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):  # stays float32 inside a bf16 autocast region
        return F.linear(x.float(), layer.weight.float(), bias)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear in its parameter dtype (upstream runs these in bf16 under autocast)."""
    return layer(x.to(layer.weight.dtype))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype (upstream WanLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """RMS norm over the full width (all heads together), in float32, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


@dataclass
class Modulation:
    """Time conditioning of one forward.

    `e` [B, U, dim] and `e0` [B, U, 6, dim] hold one row per distinct timestep value of a sample;
    `index` [B, L] maps tokens to rows (None when every token of a sample shares one timestep,
    which avoids upstream's per-token [B, L, 6, dim] tensor: ~9 GB at 720p A14B).
    """

    e: torch.Tensor
    e0: torch.Tensor
    index: torch.Tensor | None

    def per_token(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [B, U, dim] -> [B, L, dim] (or [B, 1, dim] to broadcast)."""
        if self.index is None:
            return rows
        return torch.gather(rows, 1, self.index[..., None].expand(-1, -1, rows.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# Attention and blocks
# ----------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with RMS q/k norm over the full width (self- or cross-attention)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, source: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        b, n = x.shape[0], self.num_heads
        q = self.norm_q(linear(self.q, x)).unflatten(-1, (n, -1))  # [B, Lq, heads, head_dim]
        k = self.norm_k(linear(self.k, source)).unflatten(-1, (n, -1))  # [B, Lk, heads, head_dim]
        v = linear(self.v, source).unflatten(-1, (n, -1))
        if freqs is not None:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        # upstream's flash-attn casts q/k/v to half precision; with fp32 parameters we stay in fp32
        dtype = v.dtype
        out = F.scaled_dot_product_attention(
            q.to(dtype).transpose(1, 2), k.to(dtype).transpose(1, 2), v.transpose(1, 2)
        )  # [B, heads, Lq, head_dim]
        out = out.transpose(1, 2).reshape(b, -1, n * out.shape[-1])
        return linear(self.o, out)


class Block(nn.Module):
    """Gated self-attention, ungated cross-attention (affine norm3), gated tanh-GELU FFN."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.dim
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d)
        )

    def forward(
        self, x: torch.Tensor, mod: Modulation, context: torch.Tensor, freqs: torch.Tensor
    ) -> torch.Tensor:
        table = self.modulation.float() + mod.e0  # [B, U, 6, dim] float32
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (
            mod.per_token(table[:, :, i]) for i in range(6)
        )
        h = self.norm1(x).float() * (1 + scale_msa) + shift_msa
        x = x + self.self_attn(h, h, freqs) * gate_msa  # from here on x is float32 (upstream promotion)
        x = x + self.cross_attn(self.norm3(x), context, None)  # no modulation, no gate (upstream)
        h = self.norm2(x).float() * (1 + scale_ffn) + shift_ffn
        ffn = self.ffn[2](self.ffn[1](linear(self.ffn[0], h)))
        return x + ffn * gate_ffn


class Head(nn.Module):
    """Final norm modulated by the time embedding `e` (not e0), then a float32 Linear."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)

    def forward(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        table = self.modulation.float()[None] + mod.e[:, :, None, :]  # [B, U, 2, dim]
        shift, scale = mod.per_token(table[:, :, 0]), mod.per_token(table[:, :, 1])
        return linear_fp32(self.head, self.norm(x) * (1 + scale) + shift)


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class WanTransformer(nn.Module):
    """forward(x [B,C_in,F,H,W], t [B] or [B, F*H*W/4], context [B,L,text_dim], y) -> [B,C_out,F,H,W]."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.num_heads} heads of even width")
        self.config = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        # Memory placement of the blocks (None: all resident); set by a placement policy, never by the model.
        self.block_source: BlockSource | None = None

    # -- conditioning -----------------------------------------------------------------------------

    def embed_time(self, t: torch.Tensor, num_tokens: int) -> Modulation:
        """Time embedding once per distinct timestep value (same result as upstream's per-token path)."""
        b = t.shape[0]
        if t.dim() == 2 and t.shape[1] != num_tokens:
            raise ValueError(f"per-token timesteps have {t.shape[1]} entries, expected {num_tokens}")
        t2 = t.reshape(b, -1)
        uniform = bool((t2 == t2[:, :1]).all())
        if uniform:
            values, index = t2[:, :1], None  # [B, 1]
        else:
            uniq, inverse = torch.unique(t2, return_inverse=True)
            values, index = uniq[None].expand(b, -1), inverse  # [B, U], [B, L]
        feats = sinusoidal_embedding(values.flatten(), self.config.freq_dim).float()  # [B*U, freq_dim]
        emb = self.time_embedding
        e = linear_fp32(emb[2], F.silu(linear_fp32(emb[0], feats)))  # [B*U, dim]
        e0 = linear_fp32(self.time_projection[1], F.silu(e))  # [B*U, 6*dim]
        u = values.shape[1]
        return Modulation(e=e.view(b, u, -1), e0=e0.view(b, u, 6, -1), index=index)

    def embed_text(self, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Zero-pad to text_len rows, then project; the padded rows stay and are attended to (upstream)."""
        text_len = self.config.text_len
        rows = list(context)
        for r in rows:
            if r.shape[0] > text_len:
                raise ValueError(f"context has {r.shape[0]} rows, more than text_len {text_len}")
        padded = torch.stack(
            [F.pad(r, (0, 0, 0, text_len - r.shape[0])) for r in rows]
        )  # [B, text_len, text_dim]
        emb = self.text_embedding
        return linear(emb[2], emb[1](linear(emb[0], padded)))

    # -- forward ----------------------------------------------------------------------------------

    def run_blocks(
        self, x: torch.Tensor, mod: Modulation, context: torch.Tensor, freqs: torch.Tensor
    ) -> torch.Tensor:
        blocks = self.blocks if self.block_source is None else self.block_source.iter_blocks(self.blocks)
        for block in blocks:
            x = block(x, mod, context, freqs)
        return x

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | list[torch.Tensor],
        y: torch.Tensor | None = None,
        *,
        cache: ResidualCacheLike | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y], dim=1)  # i2v: [noise 16 | mask 4 | image latent 16]
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"input has {x.shape[1]} channels, the model expects {cfg.in_dim}")
        patches = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # [B, dim, F, H/2, W/2]
        grid = tuple(patches.shape[2:])
        h = rearrange(patches, "b c f h w -> b (f h w) c")  # tokens in (f, h, w) row-major order
        mod = self.embed_time(t, h.shape[1])
        ctx = self.embed_text(context)
        freqs = grid_freqs(cfg.head_dim, grid, device=h.device)

        def blocks(h_in: torch.Tensor) -> torch.Tensor:
            return self.run_blocks(h_in, mod, ctx, freqs)

        h = cache.run(h, blocks) if cache is not None else blocks(h)
        out = self.head(h, mod)  # [B, L, p_t*p_h*p_w*out_dim], channel fastest
        pt, ph, pw = cfg.patch_size
        return rearrange(
            out,
            "b (f h w) (p q r c) -> b c (f p) (h q) (w r)",
            f=grid[0],
            h=grid[1],
            w=grid[2],
            p=pt,
            q=ph,
            r=pw,
        ).float()
