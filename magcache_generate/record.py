"""The result record of one video (returned, printed and written as the JSON sidecar)."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import torch

from magcache_generate import __version__
from magcache_generate.conditioner import Conditioned
from magcache_generate.loras import lora_records
from magcache_generate.metering import StageMeter
from magcache_generate.render import Rendered
from magcache_generate.request import Request
from magcache_generate.run_plan import RequestPlan
from wan.schedule import Schedule


def result_record(
    plan: RequestPlan,
    rendered: Rendered,
    conditioned: Conditioned,
    meter: StageMeter,
    time_to_first_step: dict[str, Any] | None,
) -> dict[str, Any]:
    """Everything the run decided and measured, but the timings and the MagCache report (added after).
    `time_to_first_step`: the process's startup report, on the item that ran the first step."""
    request, run = plan.request, plan.run
    result: dict[str, Any] = {
        "task": run.task.name,
        "seed": request.base_seed,
        "save_file": str(request.save_file),
        "frames": list(rendered.frames_shape),
        "size_wh": list(conditioned.size_wh),
        "fps": run.task.fps,
        "device": str(run.device),
        "dtype": str(run.dtype).replace("torch.", ""),
        "weights": run.weights.describe(),
        "precision": {**run.weights.precision(), "text_encoder": "bf16", "vae": "fp32"},
        "steps_run": len(plan.schedule),
        "timings_s": {},
        "text_stage_s": {part: round(seconds, 4) for part, seconds in conditioned.text_parts.items()},
        "time_to_first_step": time_to_first_step,
        "host_plan": run.host.to_json(),  # which loads overlapped other work; a batch's kept experts
        "peak_memory": meter.peak_memory(),
        "sampling": sampling_record(request, plan.schedule, rendered.dit_calls),
        "loras": lora_records(request.loras, run.task),
        "attention": run.dit_runtime.report(),
        "compile": run.compile.to_json(),
        "compile_s": round(rendered.compile_s, 4) if run.compile.enabled else None,
        "cfg_batch": run.cfg_batch.to_json(rendered.cfg_steps["batched"], rendered.cfg_steps["cfg"]),
        "request": _jsonable(dataclasses.asdict(request)),
        "negative_prompt_used": plan.negative_prompt,
        "versions": package_versions(),
    }
    if plan.memory_record is not None:
        result["memory_plan"] = plan.memory_record
    return result


def sampling_record(request: Request, schedule: Schedule, dit_calls: dict[str, int]) -> dict[str, Any]:
    """Solver, schedule and the transformer calls the loop made (cond + uncond; CFG-free steps: cond only)."""
    return {
        "solver": request.sample_solver,
        "steps": request.sample_steps,
        "shift": request.sample_shift,
        "guide_scale": list(request.guide_scale),
        "distilled": request.distilled,
        "timesteps": [schedule.timestep(i) for i in range(len(schedule))],
        "dit_calls": sum(dit_calls.values()),
        "dit_calls_by_branch": dict(dit_calls),
    }


def package_versions() -> dict[str, str]:
    import transformers

    return {
        "magcache_generate": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
