"""`--cfg-batch auto|on|off`: whether CFG steps run cond and uncond as one batch-2 forward (`wan.cfg_batch`).

Decided before any weight loads, together with the memory plan (`wan.memory_plan.plan_cfg_batch`):

- `off`: never;
- `on`: always (also on the CPU, where it is allowed for testing); refused with one line (exit 2) when
  the memory plan cannot fit the doubled activations;
- `auto` (default): on for CUDA runs when the plan has room for the doubled activations without
  giving up anything else (a resident block, an unchunked FFN, the text encoder on the GPU, an untiled
  decode): a tight budget goes to those first. Off on the CPU: no speed to gain there, and the CPU
  keeps the reference call pattern (two batch-1 forwards) the goldens were made with.

A run whose every guide scale is 1 (CFG-free: cond-only steps) has nothing to batch. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from magcache_generate.request import Request, UserError
from wan.configs import TASKS
from wan.guidance import UNCOND, expert_branches

if TYPE_CHECKING:
    from magcache_generate.budget import RunMemory

MODES = ("auto", "on", "off")


def check_cfg_batch(value: str) -> str:
    """`--cfg-batch` must be auto, on or off."""
    if value not in MODES:
        raise UserError(
            f"--cfg-batch {value!r} is not one of {', '.join(MODES)}; use auto (default), on or off"
        )
    return value


def has_cfg_steps(request: Request) -> bool:
    """Whether some step of `request` runs both the cond and the uncond forward (a guide scale != 1)."""
    experts = ("high", "low") if TASKS[request.task].two_experts else ("single",)
    return any(UNCOND in b for b in expert_branches(experts, request.guide_scale).values())


def planner_policy(requests: Sequence[Request], device_type: str) -> str:
    """How the memory planner treats batching for this run: "off", "if_free" (auto on CUDA) or "on"."""
    mode = requests[0].cfg_batch
    if mode == "off" or not any(has_cfg_steps(r) for r in requests):
        return "off"
    if mode == "on":
        return "on"
    return "if_free" if device_type == "cuda" else "off"


@dataclass(frozen=True)
class CfgBatch:
    """The run's decision, as the summary and the sidecar report it."""

    requested: str  # auto | on | off
    batched: bool  # CFG steps run as one batch-2 forward (where MagCache decides alike for both branches)
    reason: str

    def to_json(self, batched_steps: int, cfg_steps: int) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "batched": self.batched,
            "reason": self.reason,
            "batched_steps": batched_steps,
            "cfg_steps": cfg_steps,
        }


def decide_cfg_batch(requests: Sequence[Request], device_type: str, memory: RunMemory | None) -> CfgBatch:
    """The run's CFG batching, from `--cfg-batch`, the device and the memory plan (None: a CPU run)."""
    mode = requests[0].cfg_batch
    if not any(has_cfg_steps(r) for r in requests):
        return CfgBatch(mode, False, "no CFG step to batch (guide scale 1: cond-only steps)")
    if mode == "off":
        return CfgBatch(mode, False, "--cfg-batch off")
    if mode == "on":
        where = "; a CPU run: allowed for testing, no speed gain" if device_type != "cuda" else ""
        return CfgBatch(mode, True, f"--cfg-batch on{where}")
    if device_type != "cuda":
        return CfgBatch(mode, False, "auto: off on the CPU (no speed gain; the reference call pattern)")
    if memory is not None and memory.plan.cfg_batch:
        return CfgBatch(mode, True, "auto: the memory plan has room for the doubled activations")
    return CfgBatch(
        mode,
        False,
        "auto: the budget is tight (batching would cost resident blocks, FFN chunking, or moving the text "
        "encoder or VAE decode); --cfg-batch on forces it",
    )


def summary_text(record: dict[str, Any]) -> str:
    """The summary row of the sidecar's `cfg_batch` record."""
    if not record["batched"]:
        return f"off: {record['reason']}"
    steps = f"{record['batched_steps']} of {record['cfg_steps']} CFG steps as one batch-2 forward"
    return f"on: {steps}; {record['reason']}"
