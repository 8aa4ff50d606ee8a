"""The memory planner: from task, DiT shape, size, frames, weight dtype and a GPU budget, decide BEFORE
any weight loads how many DiT blocks stay resident (the rest stream from host memory), whether the
text encoder runs on the CPU, whether and how the VAE decodes in tiles, and whether the DiT's FFN and
modulation run in token chunks. Pure arithmetic on shapes: no torch, no I/O.

The stage estimates and their coefficients live in `wan.memory_costs` (the one place to
recalibrate). `fits(...)` answers "does this size and frame count fit this budget" for other checks.
Budgets and estimates are in bytes; GiB (2^30) only when printed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from wan.memory_costs import (  # noqa: F401 - re-exported: the planner's vocabulary
    CHUNKS,
    DEFAULT_TILE_PIXELS,
    GIB,
    TILE_PIXELS,
    MemoryRequest,
    TransformerShape,
    block_bytes,
    decode_stage,
    denoise_stage,
    encode_stage,
    text_stage,
    weights_label,
)

# ----------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    num_layers: int
    resident_blocks: int
    block_bytes: int
    t5_on_cpu: bool
    vae_tile_px: int | None  # None: untiled decode
    activation_chunk: int | None  # tokens per FFN/modulation chunk; None: unchunked
    estimates: dict[str, int]  # stage -> estimated peak reserved bytes
    tokens: int
    cfg_batch: bool = (
        False  # CFG steps run cond and uncond as one batch-2 forward (planned with 2x activations)
    )
    weights: str = ""  # how the DiT weights are stored (`memory_costs.weights_label`)
    sequence_shards: int = 1  # Ulysses ranks sharing the tokens (the plan is one rank's)
    weight_shards: int = 1  # --dit-fsdp ranks sharing the block weights

    @property
    def streamed_blocks(self) -> int:
        return self.num_layers - self.resident_blocks

    @property
    def vae_tiled(self) -> bool:
        return self.vae_tile_px is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "budget_gib": round(self.budget / GIB, 3),
            "resident_blocks": self.resident_blocks,
            "streamed_blocks": self.streamed_blocks,
            "block_gib": round(self.block_bytes / GIB, 4),
            "weights": self.weights,
            "t5_on_cpu": self.t5_on_cpu,
            "vae_tiled": self.vae_tiled,
            "vae_tile_px": self.vae_tile_px,
            "activation_chunk": self.activation_chunk,
            "tokens": self.tokens,
            "sequence_shards": self.sequence_shards,
            "weight_shards": self.weight_shards,
            "cfg_batch": self.cfg_batch,
            "estimated_peak_gib": {k: round(v / GIB, 3) for k, v in self.estimates.items()},
        }

    def render(self, source: str = "") -> str:
        """The plan in one short block (six lines); `source` says where the budget came from."""
        head = f"memory plan for {self.budget / GIB:.1f} GiB{f' ({source})' if source else ''}:"
        if self.streamed_blocks:
            dit = (
                f"DiT {self.resident_blocks} of {self.num_layers} blocks resident, {self.streamed_blocks} "
                f"streamed from host memory ({self.block_bytes / GIB:.2f} GiB each, 2 device buffers)"
            )
        elif self.weight_shards > 1:
            dit = f"DiT all {self.num_layers} blocks resident, each sharded over {self.weight_shards} ranks (FSDP)"
        else:
            dit = f"DiT all {self.num_layers} blocks resident"
        if self.sequence_shards > 1:
            dit += f"; 1/{self.sequence_shards} of the tokens on this rank"
        weights = f"weights {self.weights}; " if self.weights else ""
        chunk = f"FFN in {self.activation_chunk}-token chunks" if self.activation_chunk else "FFN unchunked"
        t5 = "text encoder on CPU" if self.t5_on_cpu else "text encoder on GPU"
        vae = f"VAE decode tiled ({self.vae_tile_px} px tiles)" if self.vae_tiled else "VAE decode untiled"
        est = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.estimates.items())
        # short lines (under 100 columns), so that a log or a pipe shows them whole
        return (
            f"{head}\n  {dit}\n  {weights}{chunk}\n  {self.cfg_batch_text()}\n  {t5}; {vae}\n"
            f"  estimated peak GiB: {est}"
        )

    def cfg_batch_text(self) -> str:
        """What the plan does with CFG steps, for the plan block."""
        if not self.cfg_batch:
            return "CFG steps: two forwards"
        copies = " (half the streamed block copies)" if self.streamed_blocks else ""
        return f"CFG steps: one batch-2 forward{copies}"


class PlanInfeasibleError(ValueError):
    """No placement fits; the message names the smallest budget that works, or what fits the budget."""


# ----------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------


def _resident_blocks(req: MemoryRequest, chunk: int | None, t5_on_cpu: bool) -> int | None:
    """The most resident blocks (per expert) whose denoise stage fits; None if none does."""
    n = req.dit.num_layers
    if denoise_stage(req, n, chunk, t5_on_cpu) <= req.budget:
        return n
    if req.weight_shards > 1:
        return None  # FSDP holds every block (sharded): nothing streams
    for resident in range(n - 1, -1, -1):  # few dozen layers: a scan is clearer than algebra
        if denoise_stage(req, resident, chunk, t5_on_cpu) <= req.budget:
            return resident
    return None


def _try_plan(req: MemoryRequest) -> MemoryPlan | None:
    """The first plan that fits, preferring (in this order) the text encoder on the GPU, no FFN
    chunking, and as many resident blocks as the denoise (and, without offloading, the VAE) allow."""
    n = req.dit.num_layers
    for t5_on_cpu in (True,) if req.t5_cpu else (False, True):
        if text_stage(req, t5_on_cpu) > req.budget:
            continue
        for chunk in (None, *CHUNKS):
            top = _resident_blocks(req, chunk, t5_on_cpu)
            if top is None:
                continue
            if not t5_on_cpu and not req.offload and top < n:
                break  # a text encoder held all run long must not cost DiT blocks: try it on the CPU
            # without offloading the resident blocks stay through the VAE stages: fewer may be needed
            for resident in range(top, -1, -1) if not req.offload else (top,):
                tile = _decode_tile(req, resident, t5_on_cpu)
                if tile is not False and encode_stage(req, resident, t5_on_cpu) <= req.budget:
                    return _plan(req, resident, chunk, t5_on_cpu, tile)
            break  # the chunk does not change the VAE stages
    return None


def _plan(
    req: MemoryRequest, resident: int, chunk: int | None, t5_on_cpu: bool, tile: int | None
) -> MemoryPlan:
    estimates = {
        "text": text_stage(req, t5_on_cpu),
        "encode": encode_stage(req, resident, t5_on_cpu),
        "denoise": denoise_stage(req, resident, chunk, t5_on_cpu),
        "decode": decode_stage(req, tile, resident, t5_on_cpu),
    }
    if not req.image:
        del estimates["encode"]
    return MemoryPlan(
        budget=req.budget,
        num_layers=req.dit.num_layers,
        resident_blocks=resident,
        block_bytes=block_bytes(req),
        t5_on_cpu=t5_on_cpu,
        vae_tile_px=tile,
        activation_chunk=chunk,
        estimates=estimates,
        tokens=req.tokens,
        cfg_batch=req.cfg_batch,
        weights=weights_label(req),
        sequence_shards=req.sequence_shards,
        weight_shards=req.weight_shards,
    )


def _decode_tile(req: MemoryRequest, resident: int, t5_on_cpu: bool) -> int | bool | None:
    """None (untiled), a tile edge in pixels, or False when no tile fits."""
    if not req.vae_tiled and decode_stage(req, None, resident, t5_on_cpu) <= req.budget:
        return None
    candidates = [p for p in TILE_PIXELS if p <= DEFAULT_TILE_PIXELS] if req.vae_tiled else TILE_PIXELS
    for tile in candidates:
        if decode_stage(req, tile, resident, t5_on_cpu) <= req.budget:
            return tile
    return False


def minimum_budget(req: MemoryRequest) -> int:
    """The smallest budget (bytes) at which `req` has a plan: everything streamed, smallest chunk and
    tile, text encoder on the CPU."""
    lean = max(
        text_stage(req, True),
        encode_stage(req, 0, True),
        denoise_stage(req, 0, CHUNKS[-1], True),
        decode_stage(req, TILE_PIXELS[-1], 0, True),
    )
    return math.ceil(lean / (GIB / 10)) * (GIB // 10)  # rounded up to 0.1 GiB


def largest_frames(req: MemoryRequest) -> int | None:
    """The most frames (4n+1, up to the request's) that fit `req.budget` at this size; None if none."""
    if _try_plan(replace(req, frames=1)) is None:
        return None
    lo, hi = 0, (req.frames - 1) // 4  # frames = 4n+1; lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _try_plan(replace(req, frames=4 * mid + 1)) is not None:
            lo = mid
        else:
            hi = mid - 1
    return 4 * lo + 1


def fits(req: MemoryRequest) -> bool:
    """Whether this size, frame count and budget have a plan (for validation limits)."""
    return _try_plan(req) is not None


def plan_memory(req: MemoryRequest, *, budget_source: str = "--gpu-memory") -> MemoryPlan:
    """The plan for `req`, or PlanInfeasibleError naming the smallest budget that works at this size and
    the most frames that fit the given budget (or what else would help)."""
    plan = _try_plan(req)
    if plan is not None:
        return plan
    budget = f"{req.budget / GIB:.1f} GiB"
    what = f"{req.task.name} at {req.width}*{req.height} with {req.frames} frames"
    message = (
        f"{budget_source}: {budget} is too small for {what}, which needs at least "
        f"{minimum_budget(req) / GIB:.1f} GiB"
    )
    frames = largest_frames(req)
    if frames is not None:
        message += f"; within {budget} use --frame-num {frames} or fewer at this size"
    elif req.linear_bytes == 4:  # with the Linears already stored in bf16, converting saves ~1%
        message += "; --convert-model-dtype (bf16 weights) halves the DiT's share"
    elif req.weight_shards > 1:
        message += (
            "; a larger --ulysses-size shards the DiT over more GPUs, or drop --dit-fsdp (the blocks then "
            "stream from host memory)"
        )
    else:
        message += "; free GPU memory or use a larger GPU"
    raise PlanInfeasibleError(message)


# ----------------------------------------------------------------------------------------------------
# CFG as one batch-2 forward: whether the budget has room for it
# ----------------------------------------------------------------------------------------------------

CFG_BATCH_POLICIES = ("off", "if_free", "on")


def _same_placement(a: MemoryPlan, b: MemoryPlan) -> bool:
    return (a.resident_blocks, a.activation_chunk, a.t5_on_cpu, a.vae_tile_px) == (
        b.resident_blocks,
        b.activation_chunk,
        b.t5_on_cpu,
        b.vae_tile_px,
    )


def plan_cfg_batch(req: MemoryRequest, policy: str, *, budget_source: str = "--gpu-memory") -> MemoryPlan:
    """The plan of `req` with CFG batching decided by `policy`:

    - "off": two forwards per CFG step (`plan_memory`);
    - "if_free": one batch-2 forward only when its doubled activations cost nothing else: the batched
      plan keeps every block, chunk, text-encoder and VAE choice of the unbatched one (a tight budget
      spends its room on resident blocks and unchunked FFNs, not on batching);
    - "on": batched whatever it costs; PlanInfeasibleError when even that does not fit.
    """
    if policy not in CFG_BATCH_POLICIES:
        raise ValueError(f"CFG batch policy {policy!r} is not one of {CFG_BATCH_POLICIES}")
    plain = replace(req, cfg_batch=False)
    if policy == "off":
        return plan_memory(plain, budget_source=budget_source)
    batched = replace(req, cfg_batch=True)
    if policy == "on":
        plan = _try_plan(batched)
        if plan is not None:
            return plan
        plan_memory(plain, budget_source=budget_source)  # infeasible anyway: that message says why
        raise PlanInfeasibleError(
            f"--cfg-batch on: one batch-2 CFG forward (twice the activations) does not fit "
            f"{budget_source} ({req.budget / GIB:.1f} GiB) for {req.task.name} at {req.width}*{req.height} "
            f"with {req.frames} frames; it needs at least {minimum_budget(batched) / GIB:.1f} GiB; "
            "use --cfg-batch auto (or off)"
        )
    plan = plan_memory(plain, budget_source=budget_source)
    candidate = _try_plan(batched)
    return candidate if candidate is not None and _same_placement(candidate, plan) else plan
