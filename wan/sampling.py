"""THE sampling loop, shared by t2v-A14B, i2v-A14B and ti2v-5B; the tasks differ only in data.

Per step: pick the expert from the timestep, run the named cond and uncond branches as two separate
forwards (upstream order: cond first), combine them with classifier-free guidance, advance the solver,
re-impose the task's known latent frames. When the active expert's guide scale is 1 the step is
CFG-free: only the conditional forward runs (the Lightning fork's ``use_cfg``), half the forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from wan.conditioning import Conditioning
from wan.guidance import UNCOND, branches_for, guide_scale_for
from wan.schedule import Schedule, expert_for
from wan.solvers import initial_state, step


class ModelProvider(Protocol):
    def activate(self, expert: str) -> nn.Module:
        """The model for `expert` ("high" | "low" | "single"), ready on the run device."""
        ...


class StepCache(Protocol):
    """A step-skipping cache (MagCache) or a calibration recorder; the transformer calls `run`."""

    def begin_call(self, step: int, branch: str, expert: str) -> None: ...

    def run(self, h: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepInfo:
    index: int
    total: int
    timestep: int | float
    expert: str
    guide_scale: float
    branches: tuple[str, ...] = ("cond", "uncond")  # the forwards this step ran


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def sample(
    noise: torch.Tensor,
    schedule: Schedule,
    models: ModelProvider,
    context: torch.Tensor | list[torch.Tensor],
    context_null: torch.Tensor | list[torch.Tensor],
    *,
    guide_scale: tuple[float, float],
    boundary: float | None,
    conditioning: Conditioning | None = None,
    cache: StepCache | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> torch.Tensor:
    """Flow-matching sampling with CFG from `noise` [B, C, T, H, W]; returns the final latent x0.

    Steps whose expert has guide scale 1 run only the conditional forward (`wan.guidance`).
    """
    cond = conditioning or Conditioning()
    x = cond.impose(noise)
    state = initial_state()
    total = len(schedule)
    model, active = None, None
    for i in range(total):
        t = schedule.timestep(i)
        expert = expert_for(t, boundary)
        if expert != active:
            model = None  # drop our reference first, so the provider can free the previous expert
            model, active = models.activate(expert), expert
        scale = guide_scale_for(expert, guide_scale)
        branches = branches_for(scale)
        t_model = cond.model_timestep(t, x)
        with torch.inference_mode():
            if cache is not None:
                cache.begin_call(i, "cond", expert)
            v = model(x, t_model, context, cond.y, cache=cache)
            if UNCOND in branches:
                if cache is not None:
                    cache.begin_call(i, "uncond", expert)
                v_uncond = model(x, t_model, context_null, cond.y, cache=cache)
                v = cfg(v, v_uncond, scale)
            x, state = step(schedule.solver, x, v, schedule, i, state)
            x = cond.impose(x)
        if on_step is not None:
            on_step(StepInfo(i, total, t, expert, scale, branches))
    return x


class StaticModels:
    """Models that are already placed: {"high": m, "low": m} or {"single": m}."""

    def __init__(self, models: dict[str, nn.Module]):
        self.models = models

    def activate(self, expert: str) -> nn.Module:
        return self.models[expert]
