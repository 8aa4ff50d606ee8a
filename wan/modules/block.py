"""One Wan 2.2 DiT block (upstream `WanAttentionBlock`) and the numerics helpers it shares with the model.

Numerics follow upstream's regime: with bf16 parameters (or fp32 parameters under bf16 autocast) the
Linears and attention run in bf16, while norms, modulation, the gated residual adds and the residual
stream are float32; with fp32 parameters and no autocast everything is float32 (the goldens' regime).
RoPE is applied in float32 from a cached table (upstream: float64; see `wan.modules.rope`).

Memory (what differs from a literal port, none of it changes a value):
- the block input is normalised, modulated and cast once, then feeds q, k and v;
- modulation, RMSNorm, RoPE and the residual adds work in place on tensors the block just created,
  and RMSNorm/RoPE process bounded token slices, so no full-size float32 temporaries pile up;
- with `BlockRuntime.chunk` set, every token-local stage (norms, projections, FFN, residual adds)
  runs over token chunks of that size; only attention sees the whole sequence. The FFN hidden state
  (tokens x ffn_dim) then exists for one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from wan.modules.attention import AttentionPolicy
from wan.modules.rope import RopeTable, apply_rope

if TYPE_CHECKING:
    from wan.modules.transformer import TransformerConfig

# Rows of a block's modulation table, in upstream's chunk order.
SHIFT_MSA, SCALE_MSA, GATE_MSA, SHIFT_FFN, SCALE_FFN, GATE_FFN = range(6)
NORM_TOKENS = 8192  # rows RMSNorm normalises per pass: bounds its float32 temporaries (row-wise: exact)
Spans = list[tuple[int, int]]


class BlockRunner(Protocol):
    """Runs `block.compute(x, mod, context, runtime)`, e.g. compiled (see `wan.modules.compile`)."""

    def __call__(
        self, block: Block, x: torch.Tensor, mod: Modulation, context: torch.Tensor, runtime: BlockRuntime
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class BlockRuntime:
    """What every block of one forward shares besides x, the time conditioning and the text context."""

    rope: RopeTable
    attention: AttentionPolicy
    chunk: int | None = None  # tokens per chunk of the token-local stages; None: the whole sequence
    runner: BlockRunner | None = None  # None: eager


@dataclass
class Modulation:
    """Time conditioning of one forward.

    `e` [B, U, dim] and `e0` [B, U, 6, dim] hold one row per distinct timestep value of a sample;
    `index` [B, L] maps tokens to rows (None when every token of a sample shares one timestep, which
    avoids upstream's per-token [B, L, 6, dim] tensor: ~9 GB at 720p A14B).
    """

    e: torch.Tensor
    e0: torch.Tensor
    index: torch.Tensor | None

    def per_token(self, rows: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """rows [B, U, dim] -> [B, end - start, dim] for tokens start..end (or [B, 1, dim] to broadcast)."""
        if self.index is None:
            return rows
        index = self.index[:, start:end]
        return torch.gather(rows, 1, index[..., None].expand(-1, -1, rows.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# Numerics helpers
# ----------------------------------------------------------------------------------------------------


def compute_dtype(layer: nn.Linear, device: torch.device) -> torch.dtype:
    """The dtype a Linear computes in: the autocast dtype inside an autocast region, else its weights'."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return layer.weight.dtype


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear in its compute dtype (upstream runs these in bf16 under autocast)."""
    return layer(x.to(compute_dtype(layer, x.device)))


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in float32 whatever its parameter dtype (upstream's autocast(float32) regions)."""
    bias = layer.bias.float() if layer.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):  # stays float32 inside a bf16 autocast region
        return F.linear(x.float(), layer.weight.float(), bias)


def token_spans(length: int, chunk: int | None) -> Spans:
    """[(start, end)] covering 0..length in chunks of `chunk` tokens (one span when chunk is None)."""
    if chunk is None or chunk >= length:
        return [(0, length)]
    return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def over_spans(
    spans: Spans, part: Callable[[int, int], tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, ...]:
    """The [B, L, ...] tensors whose tokens s..e are part(s, e): computed whole for one span, else
    chunk by chunk into buffers (so only one chunk's temporaries exist at a time)."""
    if len(spans) == 1:
        return part(*spans[0])
    outs: tuple[torch.Tensor, ...] = ()
    for s, e in spans:
        pieces = part(s, e)
        if not outs:
            outs = tuple(p.new_empty((p.shape[0], spans[-1][1], *p.shape[2:])) for p in pieces)
        for out, piece in zip(outs, pieces, strict=True):
            out[:, s:e] = piece
        del pieces
    return outs


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype (upstream WanLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def modulate(norm: LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """upstream's `norm(x).float() * (1 + scale) + shift` in float32, in place on the fresh norm output."""
    return norm(x).float().mul_(1 + scale).add_(shift)


class RMSNorm(nn.Module):
    """RMS norm over the full width (all heads together) in float32, cast back, then times the weight
    (upstream WanRMSNorm). Rows are normalised NORM_TOKENS at a time into the output."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, self.weight.dtype), device=x.device)
        rows, rows_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
        for s in range(0, rows.shape[0], NORM_TOKENS):
            rows_out[s : s + NORM_TOKENS] = self._norm(rows[s : s + NORM_TOKENS])
        return out

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ----------------------------------------------------------------------------------------------------
# Attention and the block
# ----------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Projections of multi-head attention with RMS q/k norm over the full width; the kernel itself is
    the forward's AttentionPolicy."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # [B, L, dim] -> [B, L, heads, head_dim]

    def query(self, x: torch.Tensor, dtype: torch.dtype, rope: RopeTable | None, start: int) -> torch.Tensor:
        return _as_attention_input(self.heads(self.norm_q(linear(self.q, x))), dtype, rope, start)

    def key(self, x: torch.Tensor, dtype: torch.dtype, rope: RopeTable | None, start: int) -> torch.Tensor:
        return _as_attention_input(self.heads(self.norm_k(linear(self.k, x))), dtype, rope, start)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(linear(self.v, x))


def _as_attention_input(
    x: torch.Tensor, dtype: torch.dtype, rope: RopeTable | None, start: int
) -> torch.Tensor:
    """Rotate (self-attention) and cast to the attention dtype; `x` is fresh, so it is reused when it can."""
    if rope is None:
        return x.to(dtype)
    out = x if x.dtype == dtype else torch.empty(x.shape, dtype=dtype, device=x.device)
    return apply_rope(x, rope, start=start, out=out)


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
        self, x: torch.Tensor, mod: Modulation, context: torch.Tensor, runtime: BlockRuntime
    ) -> torch.Tensor:
        if runtime.runner is not None:
            return runtime.runner(self, x, mod, context, runtime)
        return self.compute(x, mod, context, runtime)

    def compute(
        self, x: torch.Tensor, mod: Modulation, context: torch.Tensor, runtime: BlockRuntime
    ) -> torch.Tensor:
        """The block itself: x [B, L, dim] (bf16 for block 0, float32 after) -> float32 [B, L, dim]."""
        table = self.modulation.float() + mod.e0  # [B, U, 6, dim] float32

        def row(i: int, s: int, e: int) -> torch.Tensor:
            return mod.per_token(table[:, :, i], s, e)

        spans = token_spans(x.shape[1], runtime.chunk)
        dtype = compute_dtype(self.self_attn.q, x.device)
        x = self._self_attention(x, row, runtime, spans, dtype)  # a new float32 tensor (upstream promotion)
        self._cross_attention(x, context, runtime, spans, dtype)  # in place on it from here on
        self._ffn(x, row, spans, dtype)
        return x

    def _self_attention(
        self, x: torch.Tensor, row: Callable, runtime: BlockRuntime, spans: Spans, dtype: torch.dtype
    ) -> torch.Tensor:
        attn, rope = self.self_attn, runtime.rope

        def projections(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h = modulate(self.norm1, x[:, s:e], row(SHIFT_MSA, s, e), row(SCALE_MSA, s, e)).to(dtype)
            return attn.query(h, dtype, rope, s), attn.key(h, dtype, rope, s), attn.value(h)

        q, k, v = over_spans(spans, projections)
        out = runtime.attention(q, k, v, "self")  # [B, L, heads, head_dim]
        del q, k, v

        def residual(s: int, e: int) -> tuple[torch.Tensor]:  # x + o(out) * gate, summed in place
            y = linear(attn.o, out[:, s:e].flatten(2)) * row(GATE_MSA, s, e)
            return (y.add_(x[:, s:e]),)

        return over_spans(spans, residual)[0]

    def _cross_attention(
        self, x: torch.Tensor, context: torch.Tensor, runtime: BlockRuntime, spans: Spans, dtype: torch.dtype
    ) -> None:
        attn = self.cross_attn
        k, v = attn.key(context, dtype, None, 0), attn.value(context)
        (q,) = over_spans(spans, lambda s, e: (attn.query(self.norm3(x[:, s:e]), dtype, None, s),))
        out = runtime.attention(q, k, v, "cross")
        del q
        for s, e in spans:  # no modulation and no gate (upstream)
            x[:, s:e].add_(linear(attn.o, out[:, s:e].flatten(2)))

    def _ffn(self, x: torch.Tensor, row: Callable, spans: Spans, dtype: torch.dtype) -> None:
        for s, e in spans:
            h = modulate(self.norm2, x[:, s:e], row(SHIFT_FFN, s, e), row(SCALE_FFN, s, e)).to(dtype)
            hidden = linear(self.ffn[0], h)
            del h
            torch.ops.aten.gelu_(hidden, approximate="tanh")  # in place: same values as nn.GELU
            y = linear(self.ffn[2], hidden)
            del hidden
            x[:, s:e].add_(y * row(GATE_FFN, s, e))
