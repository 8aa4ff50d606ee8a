"""What a run says before it loads anything about the fast path: the distilled recipe in effect, its
CFG-free steps, a recipe without its LoRA, and MagCache on a schedule where it cannot skip. Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING

from magcache_generate.distilled import RECIPES
from magcache_generate.request import Request
from wan.configs import TASKS
from wan.guidance import cfg_free_experts

if TYPE_CHECKING:
    from magcache_generate.magcache.plan import Plan
    from magcache_generate.validate import GenerateOptions

EXPERT_NAMES = {"high": "high-noise", "low": "low-noise", "single": "single"}


def fast_path_notes(options: GenerateOptions, request: Request, plan: Plan | None) -> list[str]:
    """Rich-markup lines to print before loading (empty for an ordinary run)."""
    cfg = TASKS[request.task]
    experts = ("high", "low") if cfg.two_experts else ("single",)
    notes = []
    if request.distilled is not None:
        recipe = RECIPES[request.distilled]
        implied = (
            " (implied by --lora-dir, as in the Lightning fork; --distilled none keeps the task defaults)"
        )
        notes.append(
            f"--distilled {recipe.name}{implied if options.distilled is None else ''}: "
            f"{request.sample_solver}, {request.sample_steps} steps, shift {request.sample_shift:g}, "
            f"guide scale {'/'.join(f'{g:g}' for g in request.guide_scale)} (each overridable)"
        )
        if not request.loras:
            notes.append(
                f"[yellow]warning:[/] --distilled {recipe.name} without a LoRA: unless --ckpt-dir holds distilled "
                "weights, the base model at 4 steps without CFG gives a blurry video; add the Lightning LoRAs "
                "with --lora-dir DIR (or --lora-high FILE --lora-low FILE)"
            )
    if any(c.flag == "--lora-dir" for c in request.loras) and request.sample_solver != "euler":
        notes.append(
            f"[yellow]warning:[/] --lora-dir with --sample-solver {request.sample_solver}: the Lightning "
            "LoRAs were distilled for the euler solver"
        )
    free = cfg_free_experts(experts, request.guide_scale)
    if free:
        names = " and ".join(EXPERT_NAMES[e] for e in free) if cfg.two_experts else "the model"
        notes.append(
            f"guide scale 1 on {names}: conditional forward only (CFG-free), half the DiT forwards there"
        )
    if plan is not None and plan.no_skip_reason:
        notes.append(f"[yellow]note:[/] {plan.no_skip_reason}")
    return notes
