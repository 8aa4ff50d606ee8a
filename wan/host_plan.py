"""The host side of a run's memory plan: which model loads overlap other work, and whether a batch keeps
both experts of a two-expert task in host memory. Pure arithmetic on byte counts: no torch, no I/O.

Three decisions, made once before any weight loads:

- the first expert loads while the text encoder reads and encodes (loading is I/O, encoding compute),
  unless both would meet on an accelerator that the plan gives to one of them at a time (a GPU run with
  `--offload-model` and the text encoder on the GPU);
- the second expert of a two-expert task loads in the background while the first denoises, when the
  accelerator holds both anyway (no offloading), or on a CPU run with offloading (where the finished
  expert is freed) when the host has room for both at once (`MemAvailable` as read before loading,
  less a headroom);
- a batch keeps the idle expert in host memory for the next item instead of reloading it, when the
  host has room for it next to the other.

`MemAvailable` unknown (not Linux): nothing that could double the host's share is planned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
HOST_HEADROOM = 4 * GIB  # host RAM left free beyond the models (the OS, the VAE, frames)

BACKGROUND = "background load"
WHEN_NEEDED = "loaded when needed"


@dataclass(frozen=True)
class HostFacts:
    """What the host planner needs to know about a run. Byte counts are of one expert in its storage
    dtypes: `expert_bytes` whole, `expert_host_bytes` the part that lives in host memory while it is
    active (all of it on a CPU run; the streamed blocks on a GPU run)."""

    experts: int  # 1 or 2
    device_type: str  # "cpu" | "cuda"
    offload: bool
    t5_on_device: bool  # the text encoder runs on the accelerator (a GPU run without --t5-cpu)
    device_room_for_both: bool  # the GPU budget holds the text stage and the first expert's device part
    batch: bool  # more than one video (or --magcache-verify's return to the first expert)
    expert_bytes: int
    expert_host_bytes: int
    t5_host_bytes: int  # the text encoder's share of host memory during the run (0 on the GPU)
    available: int | None  # MemAvailable in bytes, None where unknown


@dataclass(frozen=True)
class HostPlan:
    text_overlap: bool  # the first expert loads while the text encoder works
    second_background: bool  # the second expert loads while the first denoises
    keep_experts: bool  # a batch keeps both experts in host memory (or on the accelerator)
    available: int | None
    need_both: int  # host bytes that holding both experts' host parts needs, headroom included
    reason: str  # why the second expert is loaded when needed ("" when in the background)
    batch: bool = False  # the run has more than one video to make

    def render(self) -> str:
        """The plan's host lines (short, under 100 columns)."""
        have = "unknown" if self.available is None else f"{self.available / GIB:.1f} GiB"
        text = "with the text encoder" if self.text_overlap else "after the text encoder"
        lines = [f"host plan (MemAvailable {have}):", f"  first expert: loads {text}"]
        if self.need_both:
            second = BACKGROUND if self.second_background else f"{WHEN_NEEDED} ({self.reason})"
            lines.append(f"  second expert: {second}")
            if self.batch:
                kept = "both experts kept" if self.keep_experts else "experts reloaded per item"
                lines.append(f"  batch: {kept}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "available_gib": None if self.available is None else round(self.available / GIB, 3),
            "first_expert_with_text": self.text_overlap,
            "second_expert": BACKGROUND if self.second_background else WHEN_NEEDED,
            "keep_experts": self.keep_experts,
            "need_both_gib": round(self.need_both / GIB, 3),
        }


def plan_host(facts: HostFacts) -> HostPlan:
    """The host decisions of one run (see the module docstring)."""
    shared_gpu = facts.device_type != "cpu" and facts.offload and facts.t5_on_device
    text_overlap = not shared_gpu or facts.device_room_for_both
    if facts.experts < 2:
        return HostPlan(text_overlap, False, False, facts.available, 0, "one expert")
    both = 2 * facts.expert_host_bytes + facts.t5_host_bytes + HOST_HEADROOM
    room = facts.available is not None and facts.available >= both
    if not facts.offload:  # both experts stay where they run once loaded: loading early costs nothing more
        return HostPlan(text_overlap, True, facts.batch, facts.available, both, "", facts.batch)
    if facts.device_type != "cpu":
        reason = "--offload-model: one expert on the GPU at a time"
        # a parked expert moves whole to the host, next to the active one's streamed part
        parked = facts.expert_bytes + facts.expert_host_bytes + facts.t5_host_bytes + HOST_HEADROOM
        keep = facts.batch and facts.available is not None and facts.available >= parked
        return HostPlan(text_overlap, False, keep, facts.available, both, reason, facts.batch)
    if facts.available is None:
        reason = "host memory unknown"
    else:
        reason = f"{both / GIB:.1f} GiB host needed for both, {facts.available / GIB:.1f} GiB available"
    keep = facts.batch and room
    return HostPlan(text_overlap, room, keep, facts.available, both, "" if room else reason, facts.batch)
