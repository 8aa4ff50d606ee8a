"""Ulysses sequence parallelism of the DiT over one rank group (upstream's `--ulysses_size`).

Every rank embeds the whole input (patches, time, text), then keeps its shard of the tokens: the
token count is padded up to a multiple of the group size and rank i keeps tokens i*S .. (i+1)*S.
The blocks run on the shard; the token-local stages need nothing else. Self-attention needs every
token: q, k and v go through one all-to-all each that trades the shard of all heads for all tokens of
heads/N heads, attention runs on that (the padded keys and values dropped, so no mask is needed and
the result equals the unsharded one), and one all-to-all brings the output back to the shard of all
heads. Cross-attention reads the text context, which every rank holds: it stays local. RoPE and the
per-token timesteps are sliced to the shard. After the head, one all-gather rebuilds the sequence.

Per self-attention a rank sends and receives 4 x (N-1)/N of its [S, heads, head_dim] shard
(q, k, v out, attention output back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wan.modules.block import Modulation
from wan.modules.rope import RopeTable


class UlyssesAttention:
    """Wraps the model's AttentionPolicy: self-attention through all-to-all, cross-attention local."""

    def __init__(self, inner: Any, group: Any, size: int, tokens: int):
        self.inner, self.group, self.size, self.tokens = inner, group, size, tokens

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: str = "self") -> torch.Tensor:
        if site != "self":
            return self.inner(q, k, v, site)
        q, k, v = (self._to_heads(t) for t in (q, k, v))
        # tokens past `self.tokens` are padding: drop them as keys and values (their queries are dropped
        # by the final gather), so attention equals the unsharded one without a mask
        out = self.inner(q, k[:, : self.tokens], v[:, : self.tokens], site)
        return self._to_tokens(out)

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, H, D] (this rank's tokens, every head) -> [B, N*S, H/N, D] (every token, its heads)."""
        b, s, h, d = x.shape
        n = self.size
        send = x.reshape(b, s, n, h // n, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk j goes to rank j
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[j]: rank j's tokens of our heads
        return recv.permute(1, 0, 2, 3, 4).reshape(b, n * s, h // n, d)

    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: [B, N*S, H/N, D] -> [B, S, H, D]."""
        b, ns, hn, d = x.shape
        n = self.size
        s = ns // n
        send = x.reshape(b, n, s, hn, d).permute(1, 0, 2, 3, 4).contiguous()  # token chunk j to rank j
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[j]: head group j of our tokens
        return recv.permute(1, 2, 0, 3, 4).reshape(b, s, n * hn, d)


@dataclass
class SequenceParallel:
    """The transformer's hook for Ulysses: `shard` after the embeddings, `gather` after the head.

    Set on a WanTransformer as `model.sequence_parallel` (None: one process, the whole sequence).
    """

    group: Any
    size: int
    rank: int  # index inside the group
    tokens: int | None = None  # the unsharded token count of the latest forward (set by `shard`)

    @classmethod
    def for_group(cls, group: Any) -> SequenceParallel:
        return cls(group, dist.get_world_size(group), dist.get_rank(group))

    def shard_length(self, tokens: int) -> int:
        return -(-tokens // self.size)

    def shard(
        self, h: torch.Tensor, mod: Modulation, rope: RopeTable, attention: Any
    ) -> tuple[torch.Tensor, Modulation, RopeTable, UlyssesAttention]:
        """This rank's part of the block inputs: tokens, their timestep rows, their RoPE rows, and the
        attention that exchanges them."""
        tokens = self.tokens = h.shape[1]
        s = self.shard_length(tokens)
        pad = s * self.size - tokens
        lo, hi = self.rank * s, (self.rank + 1) * s
        h = F.pad(h, (0, 0, 0, pad))[:, lo:hi]
        index = None if mod.index is None else F.pad(mod.index, (0, pad))[:, lo:hi]  # pad rows: row 0
        rotation = rope.rotation
        if pad:  # pad rows: the identity rotation (1 + 0i)
            identity = torch.ones((pad, rotation.shape[1]), dtype=rotation.dtype, device=rotation.device)
            rotation = torch.cat([rotation, identity])
        return (
            h.contiguous(),
            Modulation(e=mod.e, e0=mod.e0, index=index),
            RopeTable(rotation=rotation[lo:hi]),
            UlyssesAttention(attention, self.group, self.size, tokens),
        )

    def gather(self, out: torch.Tensor, tokens: int) -> torch.Tensor:
        """[B, S, C] of every rank -> [B, tokens, C] (the padding dropped)."""
        parts = [torch.empty_like(out) for _ in range(self.size)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :tokens]

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group (for statistics over every token, e.g. MagCache calibration)."""
        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x

    def token_statistics(self, ratio: torch.Tensor, cos_dis: torch.Tensor) -> torch.Tensor:
        """[mean, std (unbiased), mean] of two per-token values [B, S] over the real tokens of the
        whole group (padding rows left out): what one process computes over the whole sequence.

        Sums in float64 with one all-reduce, on the device (no host synchronisation)."""
        if self.tokens is None:
            raise RuntimeError("token_statistics() before a sharded forward")
        real = self.token_mask(self.tokens, ratio.device)[None]  # [1, S]
        r = torch.where(real, ratio.double(), 0.0)
        c = torch.where(real, cos_dis.double(), 0.0)
        count = real.double().sum() * ratio.shape[0]
        sums = torch.stack([r.sum(), (r * r).sum(), c.sum(), count])
        dist.all_reduce(sums, group=self.group)
        total, squares, cos_total, n = sums.unbind()
        mean = total / n
        variance = ((squares - total * mean) / (n - 1)).clamp_min(0.0)
        return torch.stack([mean, variance.sqrt(), cos_total / n]).float()

    def token_mask(self, tokens: int, device: torch.device) -> torch.Tensor:
        """[S] bool: which of this rank's rows are real tokens (not padding)."""
        s = self.shard_length(tokens)
        return torch.arange(self.rank * s, (self.rank + 1) * s, device=device) < tokens
