"""`--magcache-plan --gpu-memory GB`: the memory plan a run would use on a card of that size, computed on
any machine (no GPU, no weights): the planner (`wan.memory_plan`) fed the official DiT shape of the task,
the request's size, frames and memory options, in the regime a CUDA run uses (float32 parameters whose
autocast Linears are stored bf16, or bf16 throughout with --convert-model-dtype).

Every figure is the planner's estimate; the host RAM is an estimate from the same arithmetic (streamed
blocks in page-locked memory, the text encoder when it runs on the CPU, the process), as
benchmarks/plan_table.py computes it for README's table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from magcache_generate.budget import parse_gpu_memory
from magcache_generate.distilled import apply_distilled
from magcache_generate.request import UserError
from magcache_generate.validate import (
    GenerateOptions,
    check_frame_num,
    check_limits,
    default_offload,
    resolve_guide_scale,
    resolve_size,
    task_config,
)
from wan.configs import SIZES, TaskConfig
from wan.memory_costs import GIB, OVERHEADS

# The official DiT shapes: (dim, heads, ffn_dim, layers, in_dim, out_dim) per model type.
OFFICIAL_DIT = {
    "t2v": (5120, 40, 13824, 40, 16, 16),
    "i2v": (5120, 40, 13824, 40, 36, 16),
    "ti2v": (3072, 24, 14336, 30, 48, 48),
}
PROCESS_GIB = 1.0  # torch, the CUDA context's host side, latents: a round figure


@dataclass(frozen=True)
class OfficialDit:
    """The planner's view of an official DiT (`wan.memory_costs.TransformerShape`), torch-free."""

    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    in_dim: int
    out_dim: int
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)


def official_dit(cfg: TaskConfig) -> OfficialDit:
    dim, heads, ffn, layers, in_dim, out_dim = OFFICIAL_DIT[cfg.model_type]
    return OfficialDit(dim, ffn, layers, heads, in_dim, out_dim)


@dataclass(frozen=True)
class CardPlan:
    """The plan for one card, with what it was planned for and the host RAM it implies."""

    task: str
    size: str
    frames: int
    budget_gib: float
    plan: Any  # wan.memory_plan.MemoryPlan
    host_ram_gib: float

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "size": self.size,
            "frames": self.frames,
            "gpu_memory_gib": self.budget_gib,
            **self.plan.to_json(),
            "host_ram_gib_estimate": round(self.host_ram_gib, 1),
        }

    def render(self) -> str:
        p = self.plan
        lines = [
            f"memory plan for a {self.budget_gib:g} GiB GPU: {self.task} {self.size}, {self.frames} frames",
            "  (the planner's estimates; nothing was loaded)",
        ]
        if p.sequence_shards > 1:
            fsdp = ", the DiT blocks sharded over them" if p.weight_shards > 1 else ""
            n = p.sequence_shards
            lines.append(f"  Ulysses group  : {n} GPUs, 1/{n} of the tokens on each{fsdp}")
        if p.streamed_blocks:
            lines.append(
                f"  DiT blocks     : {p.resident_blocks} of {p.num_layers} resident, {p.streamed_blocks} streamed "
                f"from host ({p.block_bytes / GIB:.2f} GiB each)"
            )
        elif p.weight_shards > 1:
            lines.append(
                f"  DiT blocks     : all {p.num_layers} resident, 1/{p.weight_shards} of each on this GPU"
            )
        else:
            lines.append(f"  DiT blocks     : all {p.num_layers} resident")
        if p.weights:
            lines.append(f"  DiT weights    : {p.weights}")
        chunk = f"in {p.activation_chunk}-token chunks" if p.activation_chunk else "unchunked"
        lines.append(f"  FFN            : {chunk}")
        lines.append(f"  CFG steps      : {p.cfg_batch_text().removeprefix('CFG steps: ')}")
        lines.append(f"  text encoder   : {'CPU' if p.t5_on_cpu else 'GPU'}")
        vae = f"tiled, {p.vae_tile_px} px tiles" if p.vae_tiled else "untiled"
        lines.append(f"  VAE decode     : {vae}")
        for stage, value in p.estimates.items():
            lines.append(f"  peak {stage:<10s}: {value / GIB:.1f} GiB GPU")
        per_rank = " per rank (ranks on one machine add up)" if p.sequence_shards > 1 else ""
        lines.append(f"  host RAM       : about {self.host_ram_gib:.0f} GiB{per_rank}")
        return "\n".join(lines)


def plan_for_card(options: GenerateOptions, budget_gib: float) -> CardPlan:
    """The memory plan of this request on a GPU with `budget_gib` GiB; UserError when none fits."""
    from magcache_generate.cfg_batching import planner_policy
    from magcache_generate.request import Request
    from wan.memory_plan import MemoryRequest, PlanInfeasibleError, plan_cfg_batch

    cfg = task_config(options.task)
    options = apply_distilled(options)
    size = resolve_size(options.size, cfg)
    frames = check_frame_num(cfg.frame_num if options.frame_num is None else options.frame_num)
    check_limits(cfg, size=size, frame_num=frames)
    width, height = SIZES[size]
    image = options.image is not None or cfg.image == "required"
    offload = default_offload(options)
    dit = official_dit(cfg)
    ulysses = check_card_layout(options, cfg, dit.num_heads, offload)
    req = MemoryRequest(
        task=cfg,
        dit=dit,
        width=width,
        height=height,
        frames=frames,
        budget=int(budget_gib * GIB),
        weight_bytes=2 if options.convert_model_dtype else 4,
        offload=offload,
        t5_cpu=options.t5_cpu,
        vae_tiled=options.vae_tiled,
        residual_cache=options.use_magcache or options.magcache_calibrate is not None,
        image=image,
        vae_during_denoise=image,
        autocast_linear_bytes=2,
        fp8_linears=options.quantize == "fp8",
        sequence_shards=ulysses,
        weight_shards=ulysses if options.dit_fsdp else 1,
        dit_freed_before_decode=options.dit_fsdp and options.prompt_file is None,
    )
    # Only the fields the CFG policy reads: the mode and the guide scales.
    probe = Request(
        task=cfg.name,
        ckpt_dir=options.ckpt_dir or Path(),
        prompt="",
        size=size,
        frame_num=frames,
        sample_solver="unipc",
        sample_steps=1,
        sample_shift=1.0,
        guide_scale=resolve_guide_scale(options.sample_guide_scale, cfg),
        base_seed=0,
        save_file=Path(),
        cfg_batch=options.cfg_batch,
    )
    try:
        plan = plan_cfg_batch(
            req, planner_policy([probe], "cuda"), budget_source=f"--gpu-memory {budget_gib:g}"
        )
    except PlanInfeasibleError as err:
        raise UserError(str(err)) from None
    return CardPlan(cfg.name, size, frames, budget_gib, plan, host_ram_gib(req, plan, cfg))


def check_card_layout(options: GenerateOptions, cfg: TaskConfig, num_heads: int, offload: bool) -> int:
    """The Ulysses size of the planned rank, with the checks a torchrun run of one group would make
    (the plan is one rank's)."""
    from magcache_generate.parallel import ParallelOptions, check_parallel

    if num_heads % options.ulysses_size:
        divisors = [n for n in range(1, num_heads + 1) if num_heads % n == 0]
        raise UserError(
            f"--ulysses-size {options.ulysses_size} does not divide the {num_heads} attention heads of "
            f"{cfg.name}; use one of {divisors}"
        )
    parallel = ParallelOptions(options.ulysses_size, options.cfg_parallel, options.dit_fsdp, options.t5_fsdp)
    world = options.ulysses_size * (2 if options.cfg_parallel else 1)
    uses_cfg = any(g != 1 for g in resolve_guide_scale(options.sample_guide_scale, cfg))
    layout = check_parallel(
        parallel,
        uses_cfg=uses_cfg,
        prompt_file=False,
        offload=offload,
        num_heads=num_heads,
        environ={"WORLD_SIZE": str(world), "RANK": "0"},
    )
    return layout.ulysses


def host_ram_gib(req: Any, plan: Any, cfg: TaskConfig) -> float:
    """Host memory one video holds at its peak (estimate): the streamed blocks (page-locked; both
    experts' when they stay placed without offloading), the text encoder when it runs on the CPU, and
    the process. An offloaded idle expert or text encoder is freed, not kept (`wan.experts`), for one
    video; a batch keeps the idle expert in host RAM only when there is room for it."""
    both = cfg.two_experts and not req.offload
    streamed = plan.streamed_blocks * plan.block_bytes * (2 if both else 1)
    t5 = (req.t5_bytes or OVERHEADS.t5_default_bytes) if plan.t5_on_cpu else 0
    return (streamed + t5) / GIB + PROCESS_GIB


def print_card_plan(options: GenerateOptions, *, as_json: bool) -> dict[str, Any] | None:
    """With `--gpu-memory GB`: print (or, with `as_json`, return) the memory plan for that card."""
    if options.gpu_memory is None:
        return None
    budget = parse_gpu_memory(options.gpu_memory)
    if budget is None:
        raise UserError(
            "--magcache-plan plans for a card of a given size: pass --gpu-memory GB (e.g. 12), not auto"
        )
    card = plan_for_card(options, budget)
    if as_json:
        return card.to_json()
    typer.echo(card.render())
    return None
