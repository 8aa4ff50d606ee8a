"""A run on the CPU says so, with an estimate of how long its denoising takes: the transformer's FLOP
count for the request's size, frames and forwards (the MagCache plan's, else every step's CFG
branches) divided by the float32 matrix-multiply rate this CPU shows in a short probe. The figure is
an estimate (attention kernels, memory traffic and the VAE are not in it) and is labelled so."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from wan.configs import SIZES, TASKS
from wan.guidance import expert_branches

if TYPE_CHECKING:
    from magcache_generate.magcache.plan import Plan
    from magcache_generate.request import Request

PROBE_SIZE = 512  # the probe's square float32 matmul: big enough to reach the BLAS rate, ~10 ms


def tokens_of(request: Request, dit_config: Any) -> int:
    """The DiT's sequence length for this request (latent frames x patches)."""
    return tokens_for(request.task, request.size, request.frame_num, dit_config)


def tokens_for(task_name: str, size: str, frame_num: int, dit_config: Any) -> int:
    """The DiT's sequence length for a video of this task, size and frame count."""
    task = TASKS[task_name]
    width, height = SIZES[size]
    st, ss = task.vae_stride[0], task.vae_stride[1]
    _, ph, pw = dit_config.patch_size
    return ((frame_num - 1) // st + 1) * (height // ss // ph) * (width // ss // pw)


def forward_flops(tokens: int, cfg: Any) -> int:
    """Multiply-adds x 2 of one DiT forward: per block q, k, v, o and the cross-attention's q, o over the
    tokens, its k, v over the text, both attention matmuls and the FFN; plus embeddings and head."""
    d, text = cfg.dim, cfg.text_len
    linears = 2 * tokens * d * d * 6 + 2 * text * d * d * 2 + 2 * tokens * d * cfg.ffn_dim * 2
    attention = 4 * tokens * tokens * d + 4 * tokens * text * d
    fixed = 2 * tokens * d * (cfg.in_dim + cfg.out_dim) * 4 + 2 * text * (cfg.text_dim * d + d * d)
    return cfg.num_layers * (linears + attention) + fixed


def forwards_of(request: Request, plan: Plan | None) -> float:
    """The DiT forwards of a run: the MagCache plan's count, or each step's CFG branches."""
    if plan is not None:
        return plan.forwards
    experts = ("high", "low") if TASKS[request.task].two_experts else ("single",)
    branches = [len(b) for b in expert_branches(experts, request.guide_scale).values()]
    return request.sample_steps * sum(branches) / len(branches)


def matmul_flops_per_second() -> float:
    """This CPU's float32 matrix-multiply rate, from a short probe (best of three)."""
    import torch

    a = torch.randn(PROBE_SIZE, PROBE_SIZE)
    torch.mm(a, a)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - start)
    return 2 * PROBE_SIZE**3 / max(best, 1e-9)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def cpu_notice(requests: list[Request], plans: list[Plan | None], dit_config: Any, asked: str) -> str:
    """The line a CPU run starts with: that it runs on the CPU, and its estimated denoising time."""
    flops = sum(
        forward_flops(tokens_of(r, dit_config), dit_config) * forwards_of(r, p)
        for r, p in zip(requests, plans, strict=True)
    )
    rate = matmul_flops_per_second()
    why = "--device cpu" if asked == "cpu" else "no CUDA device found"
    return (
        f"CPU run ({why}): denoising takes about {format_duration(flops / rate)} "
        f"(estimate: {flops:.2g} FLOP at {rate / 1e9:.0f} GFLOP/s)"
    )
