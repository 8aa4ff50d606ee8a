"""THE sampling loop, shared by t2v-A14B, i2v-A14B and ti2v-5B; the tasks differ only in data.

Per step: pick the expert from the timestep, run the named cond and uncond branches as two separate
forwards (upstream order: cond first), combine them with classifier-free guidance, advance the solver,
re-impose the task's known latent frames. When the active expert's guide scale is 1 the step is
CFG-free: only the conditional forward runs (the Lightning fork's ``use_cfg``), half the forwards.

With ``cfg_batch`` a step that runs both branches runs them as ONE forward of batch 2 (`wan.cfg_batch`:
inputs stacked cond first, output split back, CFG applied as before), when the step cache agrees: a
MagCache plan must make the same decision (compute or skip) for both branches at that step, else the
step falls back to two forwards. Same math; the memory planner decides whether there is room for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from wan.cfg_batch import repeat_batch, split_branches, stack_contexts
from wan.conditioning import Conditioning
from wan.guidance import COND, UNCOND, branches_for, guide_scale_for
from wan.schedule import Schedule, expert_for
from wan.solvers import initial_state, step


class ModelProvider(Protocol):
    def activate(self, expert: str) -> nn.Module:
        """The model for `expert` ("high" | "low" | "single"), ready on the run device."""
        ...


class StepCache(Protocol):
    """A step-skipping cache (MagCache) or a calibration recorder; the transformer calls `run`.

    One DiT call: `begin_call(step, branch, expert)`, then `run(h, blocks)`. A batched CFG step (the
    branches stacked along the batch, in `branches` order) asks `batchable(step, branches, expert)`
    first; if True it announces `begin_batched_call(step, branches, expert)` and `run` receives the
    stacked block input, which the cache treats as one call per branch (half of the batch each).
    """

    def begin_call(self, step: int, branch: str, expert: str) -> None: ...

    def batchable(self, step: int, branches: tuple[str, ...], expert: str) -> bool: ...

    def begin_batched_call(self, step: int, branches: tuple[str, ...], expert: str) -> None: ...

    def run(self, h: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


@dataclass(frozen=True)
class StepInfo:
    index: int
    total: int
    timestep: int | float
    expert: str
    guide_scale: float
    branches: tuple[str, ...] = ("cond", "uncond")  # the forwards this step ran
    batched: bool = False  # the branches ran as one batch-2 forward (cfg_batch)


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
    cfg_batch: bool = False,
) -> torch.Tensor:
    """Flow-matching sampling with CFG from `noise` [B, C, T, H, W]; returns the final latent x0.

    Steps whose expert has guide scale 1 run only the conditional forward (`wan.guidance`). With
    `cfg_batch`, a step running both branches runs them as one forward of batch 2B where `cache` agrees.
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
        batched = cfg_batch and UNCOND in branches and (cache is None or cache.batchable(i, branches, expert))
        with torch.inference_mode():
            if batched:
                contexts = {COND: context, UNCOND: context_null}
                v, v_uncond = _batched_forward(model, x, t, cond, contexts, branches, cache, i, expert)
                v = cfg(v, v_uncond, scale)
            else:
                t_model = cond.model_timestep(t, x)
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
            on_step(StepInfo(i, total, t, expert, scale, branches, batched))
    return x


def _batched_forward(
    model: nn.Module,
    x: torch.Tensor,
    t: int | float,
    cond: Conditioning,
    contexts: dict[str, torch.Tensor | list[torch.Tensor]],
    branches: tuple[str, ...],
    cache: StepCache | None,
    index: int,
    expert: str,
) -> tuple[torch.Tensor, ...]:
    """One DiT forward for `branches` (cond first): x, t and y stacked, the branches' text contexts as
    one batch; returns the output of each branch."""
    count = len(branches)
    stacked = repeat_batch(x, count)
    y = None if cond.y is None else repeat_batch(cond.y, count)
    if cache is not None:
        cache.begin_batched_call(index, branches, expert)
    text = stack_contexts([contexts[b] for b in branches])
    # model_timestep builds t (per token for ti2v with an image) for the stacked batch directly
    out = model(stacked, cond.model_timestep(t, stacked), text, y, cache=cache)
    return split_branches(out, count)
