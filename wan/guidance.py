"""Classifier-free guidance as data: which scale each expert uses and which forwards a step runs.

Torch-free, so the MagCache planner (which never imports torch) decides from the same rule as the loop.
"""

from __future__ import annotations

from collections.abc import Iterable

COND, UNCOND = "cond", "uncond"
# The Lightning fork's use_cfg: the unconditional forward runs only when |scale - 1| > 1e-6.
CFG_FREE_EPS = 1e-6


def guide_scale_for(expert: str, guide_scale: tuple[float, float]) -> float:
    """Upstream's (low, high) tuple: the high-noise expert takes index 1, everything else index 0."""
    return guide_scale[1] if expert == "high" else guide_scale[0]


def uses_cfg(scale: float) -> bool:
    """False for a guide scale of 1: uncond + 1 * (cond - uncond) is the conditional prediction."""
    return abs(scale - 1.0) > CFG_FREE_EPS


def branches_for(scale: float) -> tuple[str, ...]:
    """The forwards one step runs, in upstream order (cond first)."""
    return (COND, UNCOND) if uses_cfg(scale) else (COND,)


def expert_branches(experts: Iterable[str], guide_scale: tuple[float, float]) -> dict[str, tuple[str, ...]]:
    """Per expert ("high" | "low" | "single"), the forwards each of its steps runs."""
    return {e: branches_for(guide_scale_for(e, guide_scale)) for e in experts}


def cfg_free_experts(experts: Iterable[str], guide_scale: tuple[float, float]) -> list[str]:
    """The experts whose steps run only the conditional forward (guide scale 1)."""
    return [e for e, b in expert_branches(experts, guide_scale).items() if UNCOND not in b]
