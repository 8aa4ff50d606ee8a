"""`--compile`: torch.compile of the DiT block, shared by every block and expert, timed separately.

One compiled function runs `block.compute(...)` for all blocks: with torch's default inlining of
nn.Modules the block's parameters are graph inputs, so the 40 blocks of an expert, and both experts,
reuse one compiled graph per input signature. `dynamic=False`: one specialised graph per latent grid
(and block-input dtype: block 0 receives the bf16 patch embedding, the others the float32 residual
stream), compiled on first use and cached by torch. Attention runs outside the graph (see
AttentionPolicy), so the chosen kernel is the one that runs, compiled or not.

torch keeps a bounded number of graphs per function (`torch._dynamo.config.recompile_limit`, 8 by
default: four video sizes in one batch); past it, new sizes run eagerly (torch warns), still correct.

The first call of each new signature is where compilation happens; its host wall time is counted as
compile time (compilation is synchronous on the host, the GPU work it launches is not waited for, so
nothing is synchronised).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from wan.modules.block import autocast_on, compute_dtype

if TYPE_CHECKING:
    from wan.modules.block import Block, BlockRuntime, Modulation


def _compute(
    block: Block,
    x: torch.Tensor,
    mod: Modulation,
    context: torch.Tensor,
    runtime: BlockRuntime,
    dtype: torch.dtype,
) -> torch.Tensor:
    return block.compute(x, mod, context, runtime, dtype)


class BlockCompiler:
    """A BlockRunner (`model.block_runner = BlockCompiler()`) running blocks through torch.compile.

    `compile_seconds`: host time spent in the first call of each new input signature (compilation);
    `signatures`: how many were compiled.
    """

    def __init__(self, *, backend: str = "inductor", mode: str | None = None):
        self.backend, self.mode = backend, mode
        self._compiled = torch.compile(_compute, backend=backend, mode=mode, dynamic=False)
        self._seen: set[tuple[Any, ...]] = set()
        self.compile_seconds = 0.0

    @property
    def signatures(self) -> int:
        return len(self._seen)

    def __call__(
        self, block: Block, x: torch.Tensor, mod: Modulation, context: torch.Tensor, runtime: BlockRuntime
    ) -> torch.Tensor:
        dtype = compute_dtype(block.self_attn.q, x.device)  # here: autocast queries break the graph
        key = _signature(block, x, mod, context, runtime)
        if key in self._seen:
            return self._compiled(block, x, mod, context, runtime, dtype)
        start = time.perf_counter()
        out = self._compiled(block, x, mod, context, runtime, dtype)
        self.compile_seconds += time.perf_counter() - start
        self._seen.add(key)
        return out


def _signature(
    block: Block, x: torch.Tensor, mod: Modulation, context: torch.Tensor, runtime: BlockRuntime
) -> tuple[Any, ...]:
    """What makes torch compile a new graph here (metadata only: shapes, dtypes, devices, modes)."""

    def meta(t: torch.Tensor | None) -> tuple[Any, ...] | None:
        return None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.device)

    return (
        meta(x),
        meta(mod.e0),
        meta(mod.index),
        meta(context),
        meta(runtime.rope.rotation),
        runtime.chunk,
        block.modulation.dtype,
        autocast_on(x.device),
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
    )
