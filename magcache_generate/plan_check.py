"""The MagCache plan before anything loads: `--magcache-plan` (printed, or JSON) and the check every
run makes, so that an unreachable --magcache-speedup or a setting the plan refuses fails in a second."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer

from magcache_generate.request import Request, UserError
from magcache_generate.validate import PlanSettings
from wan.configs import TASKS

if TYPE_CHECKING:
    from magcache_generate.compile_choice import CompileChoice
    from magcache_generate.magcache.plan import Plan


def plan_settings_for(request: Request) -> PlanSettings:
    cfg = TASKS[request.task]
    has_image = request.image is not None or cfg.image == "required"
    return PlanSettings(
        cfg,
        request.sample_solver,
        request.sample_steps,
        request.sample_shift,
        has_image,
        request.magcache,
        request.guide_scale,
    )


def check_magcache_plan(request: Request) -> Plan | None:
    """Plan a MagCache run before loading anything, so an unreachable --magcache-speedup (or a setting the
    plan refuses) fails in a second rather than after the models are loaded."""
    if request.magcache.enabled:
        return build_plan(plan_settings_for(request))
    return None


def build_plan(settings: PlanSettings) -> Plan:
    """The MagCache schedule these settings give: the official curve (or --magcache-ratios), the task's
    preset with the given overrides, on the loop's real timesteps. Loads no weights. The run builds its
    plan with the same function (magcache.settings.make_plan)."""
    from magcache_generate.magcache.plan import UnreachableSpeedupError
    from magcache_generate.magcache.policy import MagCacheConfigError
    from magcache_generate.magcache.settings import make_plan
    from wan.schedule import make_schedule

    schedule = make_schedule(settings.sample_solver, settings.sample_steps, settings.sample_shift)
    timesteps = [int(t) for t in schedule.timesteps[: len(schedule)]]
    try:
        return make_plan(
            settings.task.name,
            timesteps,
            settings.sample_shift,
            settings.magcache,
            settings.has_image,
            log=lambda _message: None,
            guide_scale=settings.guide_scale,
        )
    except (MagCacheConfigError, UnreachableSpeedupError) as err:
        raise UserError(str(err)) from None


def print_plan(
    settings: PlanSettings,
    *,
    as_json: bool,
    memory: dict | None = None,
    compile_choice: CompileChoice | None = None,
) -> None:
    """The MagCache plan (printed, or one JSON object that carries `memory`, the card's memory plan, and
    `compile`, the --compile decision; printed, the caller states that one)."""
    from magcache_generate.magcache.report import plan_json, render_plan, round_speedup

    p = build_plan(settings)
    if not as_json:
        typer.echo(render_plan(p))
        return
    data = {
        **plan_json(p),
        "thresh": p.config.thresh,
        "K": p.config.K,
        "retention": p.config.retention,
        "curve": p.curve_key,
        "cfg_free_experts": p.cfg_free_experts,
        "ideal_speedup": round_speedup(p.ideal_speedup),
        "warnings": list(p.warnings),
        **({"memory_plan": memory} if memory is not None else {}),
        **({"compile": compile_choice.to_json()} if compile_choice is not None else {}),
    }
    typer.echo(json.dumps(data))
