"""CFG as one batch-2 forward: the cond and uncond inputs stacked along the batch, the output split back.

Same math as two forwards: every stage of the DiT is per sample (attention and cross-attention within
a sample, norms, modulation and the FFN per token), so the stacked forward computes each branch's
output from that branch's inputs alone. Only float rounding may differ (a GEMM may block its rows
differently when there are twice as many). The branch order in the batch is the loop's: cond first.

What a batched step buys: one pass over the block weights for both branches (half the kernel launches,
and with streamed blocks half the host-to-device weight copies per step); what it costs: the
activations of one forward twice over (the memory planner decides whether there is room).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Context = torch.Tensor | list[torch.Tensor]


def repeat_batch(value: torch.Tensor, times: int) -> torch.Tensor:
    """[B, ...] -> [times*B, ...]: `value` stacked `times` times along the batch (a copy)."""
    return torch.cat([value] * times)


def stack_contexts(contexts: Sequence[Context]) -> list[torch.Tensor]:
    """The text contexts of the branches as one batch: a list of [L_i, text_dim] rows, branch by branch
    (the DiT zero-pads each row to text_len, so prompts of different lengths stack)."""
    return [row for context in contexts for row in context]


def split_branches(out: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """A stacked output [count*B, ...] -> one [B, ...] view per branch, in stacking order."""
    if out.shape[0] % count:
        raise ValueError(f"a batch of {out.shape[0]} does not split into {count} branches")
    return tuple(out.chunk(count))
