"""The Wan 2.2 diffusion transformer (upstream `WanModel`), one implementation for t2v, i2v and ti2v.

Parameter names equal the official state-dict keys, so official checkpoints load without remapping.
Precision follows upstream's bf16 regime when the parameters are bf16 (or fp32 under bf16 autocast):
sinusoid in float64; time MLPs, modulation, norms, gated residual adds, residual stream and head in
float32; RoPE in float32 from a cached table (upstream: float64, a ~1e-7 relative difference); other
Linears and attention in bf16. With float32 parameters everything is float32 (the goldens' regime).
The blocks live in `wan.modules.block`, the attention kernel choice in `wan.modules.attention`.

Run-time settings, instance attributes read at every forward:
- `attention`: the AttentionPolicy (kernel choice, and the record of what ran);
- `activation_chunk`: tokens per chunk of the blocks' token-local stages (None: whole sequence);
- `block_runner`: None (eager) or a BlockRunner such as `wan.modules.compile.BlockCompiler`;
- `block_source`: memory placement of the block weights (None: all resident).
No forward reads a tensor value on the host (no `.item()`, `bool(tensor)`, `torch.unique`, sync).
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

from wan.modules.attention import AttentionPolicy
from wan.modules.block import (
    Block,
    BlockRunner,
    BlockRuntime,
    LayerNorm,
    Modulation,
    linear,
    linear_fp32,
    normalized,
    token_spans,
)
from wan.modules.rope import grid_rope

__all__ = [
    "Block",
    "BlockRuntime",
    "BlockSource",
    "Modulation",
    "ResidualCacheLike",
    "TokenTimesteps",
    "TransformerConfig",
    "WanTransformer",
]

# activation_chunk is rounded down to a multiple of this: GEMM row tiles stay aligned, so on the CPU
# a chunked forward equals the unchunked one bit for bit (CPU BLAS rounds rows past a multiple of 4
# differently), and on CUDA the chunks keep full tiles.
CHUNK_MULTIPLE = 16


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


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Timestep features in float64, cos half first (upstream order), frequencies 10000^(-i/half)."""
    half = dim // 2
    pos = t.to(torch.float64)
    angles = torch.outer(pos, torch.pow(10000, -torch.arange(half, device=t.device).to(pos).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


@dataclass(frozen=True)
class TokenTimesteps:
    """Per-token timesteps in the form the model uses without reading tensor values on the host.

    `values` [B, U]: the distinct timestep values of each sample; `index` [B, L] (int64): the row of
    `values` each token takes. ti2v with an image: values [[0, t]], index 0 on frame-0 tokens, else 1
    (built from the latent shape by `wan.conditioning`).
    """

    values: torch.Tensor
    index: torch.Tensor

    @classmethod
    def from_dense(cls, t: torch.Tensor) -> TokenTimesteps:
        """From upstream's dense [B, L] timestep tensor (the official call's ti2v form). Reads the
        values (torch.unique: one host synchronisation on CUDA), so the model does it once per call,
        before any block runs; the sampling loop builds the form directly and never pays it."""
        values, index = torch.unique(t, return_inverse=True)
        return cls(values=values[None].expand(t.shape[0], -1), index=index.reshape(t.shape))

    def dense(self) -> torch.Tensor:
        """The [B, L] timestep of every token (upstream's per-token tensor)."""
        return torch.gather(self.values, 1, self.index)


class Head(nn.Module):
    """Final norm modulated by the time embedding `e` (not e0), then a float32 Linear."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)

    def forward(self, x: torch.Tensor, mod: Modulation, chunk: int | None = None) -> torch.Tensor:
        table = self.modulation.float()[None] + mod.e[:, :, None, :]  # [B, U, 2, dim]: shift, scale
        table[:, :, 1].add_(1)  # 1 + scale, once per distinct timestep
        shift_scale = tuple(lambda a, b, i=i: mod.per_token(table[:, :, i], a, b) for i in (0, 1))

        out = torch.empty((*x.shape[:2], self.head.out_features), dtype=torch.float32, device=x.device)
        for s, e in token_spans(x.shape[1], chunk):
            h = normalized(self.norm, x[:, s:e], torch.float32, shift_scale, s)
            out[:, s:e] = linear_fp32(self.head, h)
        return out


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class WanTransformer(nn.Module):
    """forward(x [B,C_in,F,H,W], t, context [B,L,text_dim], y) -> [B,C_out,F,H,W], upstream's call.

    `t`: [B], upstream's per-token [B, L] (ti2v; one host read per call to find its distinct values),
    or TokenTimesteps (per token without any host read: what the sampling loop passes)."""

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
        self.attention = AttentionPolicy("auto")
        self.block_runner: BlockRunner | None = None
        self._activation_chunk: int | None = None

    @property
    def activation_chunk(self) -> int | None:
        """Tokens per chunk of the blocks' token-local stages (FFN, modulation, norms, projections,
        residual adds); None runs them over the whole sequence. Set by the memory planner; rounded
        down to a multiple of CHUNK_MULTIPLE (at least CHUNK_MULTIPLE)."""
        return self._activation_chunk

    @activation_chunk.setter
    def activation_chunk(self, tokens: int | None) -> None:
        if tokens is None:
            self._activation_chunk = None
            return
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"activation_chunk must be a positive number of tokens or None, not {tokens!r}")
        self._activation_chunk = max(CHUNK_MULTIPLE, tokens - tokens % CHUNK_MULTIPLE)

    # -- conditioning -----------------------------------------------------------------------------

    def embed_time(self, t: torch.Tensor | TokenTimesteps, num_tokens: int) -> Modulation:
        """Time embedding once per distinct timestep value (same result as upstream's per-token path).

        `t` is [B] (one timestep per sample), TokenTimesteps (per token; nothing is read on the host),
        or upstream's dense per-token [B, L], converted here to TokenTimesteps once per call.
        """
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == num_tokens:
            t = TokenTimesteps.from_dense(t)
        if isinstance(t, TokenTimesteps):
            if t.index.shape[1] != num_tokens:
                raise ValueError(
                    f"per-token timesteps index {t.index.shape[1]} tokens, expected {num_tokens}"
                )
            values, index = t.values, t.index  # [B, U], [B, L]
        elif t.dim() == 1:
            values, index = t[:, None], None  # [B, 1]
        else:
            raise ValueError(
                f"t has shape {tuple(t.shape)}; give [B], per-token [B, {num_tokens}] (one per patch token), "
                "or TokenTimesteps"
            )
        b, u = values.shape
        feats = sinusoidal_embedding(values.flatten(), self.config.freq_dim).float()  # [B*U, freq_dim]
        emb = self.time_embedding
        e = linear_fp32(emb[2], F.silu(linear_fp32(emb[0], feats)))  # [B*U, dim]
        e0 = linear_fp32(self.time_projection[1], F.silu(e))  # [B*U, 6*dim]
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
        self, x: torch.Tensor, mod: Modulation, context: torch.Tensor, runtime: BlockRuntime
    ) -> torch.Tensor:
        blocks = self.blocks if self.block_source is None else self.block_source.iter_blocks(self.blocks)
        for block in blocks:
            x = block(x, mod, context, runtime)
        return x

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | TokenTimesteps,
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
        runtime = BlockRuntime(
            rope=grid_rope(cfg.head_dim, grid, h.device),
            attention=self.attention,
            chunk=self._activation_chunk,
            runner=self.block_runner,
        )

        def blocks(h_in: torch.Tensor) -> torch.Tensor:
            return self.run_blocks(h_in, mod, ctx, runtime)

        h = cache.run(h, blocks) if cache is not None else blocks(h)
        out = self.head(h, mod, runtime.chunk)  # [B, L, p_t*p_h*p_w*out_dim], channel fastest
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
