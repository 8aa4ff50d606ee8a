"""Human and machine renderings of a MagCache plan (`--magcache-plan`, run logs)."""

from __future__ import annotations

import math

from magcache_generate.magcache.plan import Plan

SPEEDUP_DECIMALS = 3


def round_speedup(value: float | None) -> float | None:
    """The one rounding of every speedup figure (plan, run summary, sidecar, JSON), so all show the same
    digits; None when there is no finite figure."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, SPEEDUP_DECIMALS)


def format_speedup(value: float | None) -> str:
    rounded = round_speedup(value)
    return "n/a" if rounded is None else f"{rounded:.{SPEEDUP_DECIMALS}f}x"


def plan_json(p: Plan) -> dict:
    return {
        "task": p.task,
        "steps": p.steps,
        "mode": p.mode,
        "forwards": p.forwards,
        "dense_forwards": p.dense_forwards,
        "calls": [
            {"step": c.step, "branch": c.branch, "expert": c.expert, "computed": c.computed} for c in p.calls
        ],
    }


EXPERT_NAMES = {"high": "high-noise", "low": "low-noise", "single": "single model"}


def render_plan(p: Plan) -> str:
    """Rows of C (computed) / s (skipped) per branch, H/L per expert, then the counts."""
    c = p.config
    lines = [f"{p.task}  {p.steps} steps  mode {p.mode}  thresh {c.thresh} K {c.K} retention {c.retention}"]
    lines.append(f"  curve  : {p.curve_key}")
    if any(e != "single" for e in p.experts):
        lines.append("  expert : " + "".join("H" if e == "high" else "L" for e in p.experts))
    for b in p.branches:
        row = (("C" if p.call(s, b).computed else "s") if p.has_call(s, b) else "-" for s in range(p.steps))
        lines.append(f"  {b:<6} : " + "".join(row))
    lines.append("  step   : " + "".join(str(s % 10) for s in range(p.steps)))
    for b in p.branches:
        skipped = p.skipped_steps(b)
        lines.append(f"  {b} skipped steps {len(skipped)}: {skipped}")
    lines.append(
        f"  forwards {p.forwards} of {p.dense_forwards} dense -> ideal speedup {format_speedup(p.ideal_speedup)}"
    )
    for e in dict.fromkeys(p.experts):
        fw, dense = p.count(expert=e)
        cfg_free = ", CFG-free (guide scale 1): cond only" if e in p.cfg_free_experts else ""
        lines.append(
            f"    {EXPERT_NAMES[e]}: {fw}/{dense} forwards ({format_speedup(dense / fw if fw else None)}){cfg_free}"
        )
    lines += [f"  warning: {w}" for w in p.warnings]
    if p.no_skip_reason:
        lines.append(f"  note: {p.no_skip_reason}")
    return "\n".join(lines)
