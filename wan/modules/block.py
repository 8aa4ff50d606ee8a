"""One Wan 2.2 DiT block (upstream `WanAttentionBlock`) and the numerics helpers it shares with the model.

Numerics follow upstream's regime: with bf16 parameters (or fp32 parameters under bf16 autocast) the
Linears and attention run in bf16, while norms, modulation, the gated residual adds and the residual
stream are float32; with fp32 parameters and no autocast everything is float32 (the goldens' regime).
RoPE is applied in float32 from a cached table (upstream: float64; see `wan.modules.rope`).

Memory (what differs from a literal port; none of it changes a value):
- the block input is normalised, modulated and cast once, then feeds q, k and v;
- the modulation and the gated residual adds work in place on their fresh float32 temporaries
  (one each) or write straight into their destination, and the residual stream is updated in place
  once the block owns it, so no extra full-size float32 temporaries pile up;
- with `BlockRuntime.chunk` set (the memory planner's one knob; None when memory allows), every
  token-local stage (norms, modulation, RoPE, projections, FFN, residual adds) runs over token
  chunks of that size; only attention sees the whole sequence. The FFN hidden state (tokens x
  ffn_dim, the largest temporary) and the float32 element-wise temporaries then exist for one chunk
  at a time.

Each stage has one definition, eager and compiled alike: `--compile` fuses the element-wise chains.
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
Spans = list[tuple[int, int]]
Row = Callable[[int, int], torch.Tensor]  # tokens a..b -> modulation rows [B, b - a | 1, dim]


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


def autocast_on(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def compute_dtype(layer: nn.Linear, device: torch.device) -> torch.dtype:
    """The dtype a Linear computes in: the autocast dtype inside an autocast region, else its weights'
    (or the `compute_dtype` a layer with quantised weights declares, `wan.modules.fp8_linear`)."""
    if autocast_on(device):
        return torch.get_autocast_dtype(device.type)
    return getattr(layer, "compute_dtype", layer.weight.dtype)


def linear(layer: nn.Linear, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A Linear in its compute dtype (upstream runs these in bf16 under autocast). Blocks pass the
    dtype they decided once: asking autocast inside a compiled block breaks torch 2.11's graph."""
    return layer(x.to(dtype or compute_dtype(layer, x.device)))


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear evaluated in float32 whatever its parameter dtype (upstream's autocast(float32) regions)."""
    bias = layer.bias.float() if layer.bias is not None else None
    if not autocast_on(x.device):
        return F.linear(x.float(), layer.weight.float(), bias)
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


def normalized(
    norm: LayerNorm,
    x: torch.Tensor,
    dtype: torch.dtype,
    modulation: tuple[Row, Row] | None = None,
    start: int = 0,
) -> torch.Tensor:
    """norm(x), modulated when `modulation` gives the (shift, 1 + scale) rows of tokens start..,
    in `dtype` (the Linear that reads it): upstream's `norm(x).float() * (1 + scale) + shift` in
    float32, the multiply in place on the fresh norm output and the add writing (and rounding)
    straight into the `dtype` output. One float32 temporary; per-token rows (ti2v with an image) are
    gathered one at a time."""
    n = norm(x).float()
    if modulation is None:
        return n.to(dtype)
    shift, scale1 = modulation
    end = start + x.shape[1]
    n.mul_(scale1(start, end))
    return torch.add(n, shift(start, end), out=torch.empty(n.shape, dtype=dtype, device=n.device))


def gated_sum(x: torch.Tensor, y: torch.Tensor, gate: Row, start: int = 0) -> torch.Tensor:
    """upstream's `x + y * gate` as a new float32 tensor (y bf16 or float32, the gate float32): the
    sum lands in the fresh product (same values: float addition commutes), which is contiguous even
    when x is the token-strided patch embedding."""
    return (y * gate(start, start + x.shape[1])).add_(x)


def add_gated_(x: torch.Tensor, y: torch.Tensor, gate: Row, start: int = 0) -> None:
    """x += y * gate in place (upstream: `x = x + y * gate`; same values, no new residual stream)."""
    x.add_(y * gate(start, start + x.shape[1]))


class RMSNorm(nn.Module):
    """RMS norm over the full width (all heads together) in float32, cast back, then times the weight
    (upstream WanRMSNorm: `norm(x.float()).type_as(x) * weight`, two roundings in bf16, kept).

    The normalisation is `F.rms_norm` without weight (one fused kernel on CUDA where torch has one;
    elsewhere its float32 composite, identical to upstream's formula); the weight multiply follows
    in the output dtype.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .to(x.dtype): under autocast rms_norm returns float32; upstream rounds to x's dtype first
        normed = F.rms_norm(x, (x.shape[-1],), eps=self.eps).to(x.dtype)
        if torch.promote_types(x.dtype, self.weight.dtype) == x.dtype:
            return normed.mul_(self.weight)  # a fresh tensor of the result dtype: in place
        return normed * self.weight


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

    def prepare(
        self, projected: torch.Tensor, norm: RMSNorm, dtype: torch.dtype, rope: RopeTable | None, start: int
    ) -> torch.Tensor:
        """q or k from its projection (`linear(self.q, x)`): RMS norm, RoPE for self-attention (tokens
        start.. of the table), attention dtype; [B, L, heads, head_dim].

        Pass the projection as a temporary: it is dropped once normed."""
        normed = self.heads(norm(projected))
        del projected
        if rope is not None:
            normed = apply_rope(normed, rope, start=start)  # float32, as upstream's rotation returns
        return normed.to(dtype)


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
        self,
        x: torch.Tensor,
        mod: Modulation,
        context: torch.Tensor,
        runtime: BlockRuntime,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The block itself: x [B, L, dim] (bf16 for block 0, float32 after) -> float32 [B, L, dim].

        `dtype`: the Linears' compute dtype (`compute_dtype`), decided by a caller outside torch.compile."""
        table = self.modulation.float() + mod.e0  # [B, U, 6, dim] float32
        for i in (SCALE_MSA, SCALE_FFN):
            table[:, :, i].add_(1)  # 1 + scale, once per distinct timestep rather than per token

        def rows(i: int) -> Row:
            return lambda a, b: mod.per_token(table[:, :, i], a, b)

        spans = token_spans(x.shape[1], runtime.chunk)
        dtype = dtype or compute_dtype(self.self_attn.q, x.device)
        x = self._self_attention(x, rows, runtime, spans, dtype)  # a new float32 tensor (upstream promotion)
        self._cross_attention(x, context, runtime, spans, dtype)  # in place on it from here on
        self._ffn(x, rows, spans, dtype)
        return x

    def _self_attention(
        self,
        x: torch.Tensor,
        rows: Callable[[int], Row],
        runtime: BlockRuntime,
        spans: Spans,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        attn, rope = self.self_attn, runtime.rope

        def projections(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            h = normalized(
                self.norm1, x[:, s:e], dtype, (rows(SHIFT_MSA), rows(SCALE_MSA)), s
            )  # one cast for q, k, v
            q = attn.prepare(linear(attn.q, h, dtype), attn.norm_q, dtype, rope, s)
            k = attn.prepare(linear(attn.k, h, dtype), attn.norm_k, dtype, rope, s)
            return q, k, attn.heads(linear(attn.v, h, dtype))

        q, k, v = over_spans(spans, projections)
        out = runtime.attention(q, k, v, "self")  # [B, L, heads, head_dim]
        del q, k, v

        def residual(s: int, e: int) -> tuple[torch.Tensor]:
            return (gated_sum(x[:, s:e], linear(attn.o, out[:, s:e].flatten(2), dtype), rows(GATE_MSA), s),)

        return over_spans(spans, residual)[0]

    def _cross_attention(
        self, x: torch.Tensor, context: torch.Tensor, runtime: BlockRuntime, spans: Spans, dtype: torch.dtype
    ) -> None:
        attn = self.cross_attn
        k = attn.prepare(linear(attn.k, context, dtype), attn.norm_k, dtype, None, 0)
        v = attn.heads(linear(attn.v, context, dtype))

        def query(s: int, e: int) -> tuple[torch.Tensor]:  # temporaries only: each freed once used
            return (
                attn.prepare(
                    linear(attn.q, normalized(self.norm3, x[:, s:e], dtype), dtype),
                    attn.norm_q,
                    dtype,
                    None,
                    s,
                ),
            )

        (q,) = over_spans(spans, query)
        out = runtime.attention(q, k, v, "cross")
        del q
        for s, e in spans:  # no modulation and no gate (upstream)
            x[:, s:e].add_(linear(attn.o, out[:, s:e].flatten(2), dtype))

    def _ffn(self, x: torch.Tensor, rows: Callable[[int], Row], spans: Spans, dtype: torch.dtype) -> None:
        for s, e in spans:
            hidden = linear(
                self.ffn[0],
                normalized(self.norm2, x[:, s:e], dtype, (rows(SHIFT_FFN), rows(SCALE_FFN)), s),
                dtype,
            )
            torch.ops.aten.gelu_(hidden, approximate="tanh")  # in place: same values as nn.GELU
            y = linear(self.ffn[2], hidden, dtype)
            del hidden
            add_gated_(x[:, s:e], y, rows(GATE_FFN), s)
