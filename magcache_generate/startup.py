"""Time to first step: from the process's start to the end of the first denoising step, in parts.

The origin is the kernel's record of when the process started (``/proc/self/stat``), so the Python
interpreter's own start and the CLI's imports are counted; where that cannot be read, the origin is the
moment the command began and the record says so. Milestones are marked on the way (the first mark of a
name wins, so a batch's later items and a --magcache-verify's second run change nothing) and the parts
are the intervals between them, so they add up to the total.

On CUDA the end of the first step is read from an event recorded behind the step's kernels and resolved
after the denoising (whose end is synchronised anyway): timing the first step makes the loop wait for
nothing.

The first expert may load on a background thread while the text stage runs: then ``load`` (the wait for
it inside the denoising) is what the overlap left over, and ``expert_load_s`` gives the whole load and
how much of it ran alongside the text stage and before the denoising started.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with the runtime, not with the CLI
    import torch

ORIGIN_PROCESS = "process start (/proc/self/stat)"
ORIGIN_COMMAND = "command start (process start unreadable)"

# Milestones in the order a run passes them, and the part that ends at each.
MILESTONES = (
    ("command", "startup"),  # interpreter start, CLI imports, option parsing
    ("validated", "validation"),  # every input checked (checkpoint headers, LoRAs, memory budget)
    ("runtime_imported", "imports"),  # torch, transformers and the model code
    ("text_start", "setup"),  # device (CUDA initialisation), configs, the memory plan, expert pool
    ("text_done", "text"),  # tokenizer, umT5 read, the encode (see ``text_s`` for its parts)
    ("denoise_start", "conditioning"),  # noise, the image latent (i2v/ti2v), the cache policy
    ("first_step_done", "first_step"),  # the expert load(s) ahead of it counted apart, as ``load``
)

# A load of the pool: (expert, start, end) on the perf_counter clock (`wan.experts.ExpertPool.loads`).
LoadSpan = tuple[str, float, float]


def overlap_s(start: float, end: float, lo: float, hi: float) -> float:
    """Seconds of [start, end] inside [lo, hi]."""
    return max(0.0, min(end, hi) - max(start, lo))


def seconds_since_process_start() -> float | None:
    """How long ago the kernel started this process, or None where it cannot be read (not Linux)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        # the command name (field 2) may hold spaces: the fields after its closing parenthesis are
        # fixed, and starttime (field 22, clock ticks after boot) is the 20th of them
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        now = time.clock_gettime(time.CLOCK_BOOTTIME)  # the clock starttime counts on
        return max(0.0, now - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class StartupClock:
    """Milestones of one process on the ``perf_counter`` clock, measured from the process's start."""

    def __init__(
        self, *, origin: float | None = None, origin_source: str | None = None, now: float | None = None
    ):
        """``origin``/``now``: the process start and the command's start on ``perf_counter``'s clock
        (default: read from the kernel, and now)."""
        now = time.perf_counter() if now is None else now
        if origin is None:
            elapsed = seconds_since_process_start()
            origin, origin_source = (
                (now - elapsed, ORIGIN_PROCESS) if elapsed is not None else (now, ORIGIN_COMMAND)
            )
        self.origin = origin
        self.origin_source = origin_source or ORIGIN_COMMAND
        self.marks: dict[str, float] = {}
        self.load_s = 0.0  # expert loads between the denoising's start and the end of its first step
        self.text_s: dict[str, float] = {}  # the first text stage's parts
        self.device_init_s: float | None = None  # CUDA initialisation, within ``setup``
        self.torch_imported_in: str | None = None  # the part that paid torch's import
        self.mark("command", now)

    def mark(self, name: str, at: float | None = None) -> None:
        """Record milestone ``name`` now (or at ``at``); the first record of a name is kept."""
        self.marks.setdefault(name, time.perf_counter() if at is None else at)
        if name == "validated" and self.torch_imported_in is None:
            # validation reads .pth headers and checks the device, which may import torch early
            self.torch_imported_in = "validation" if "torch" in sys.modules else "imports"

    def text_stage(self, parts: dict[str, float]) -> None:
        """The parts of the first text stage (the one ahead of the first step)."""
        if not self.text_s:
            self.text_s = dict(parts)

    @property
    def complete(self) -> bool:
        return all(name in self.marks for name, _ in MILESTONES)

    def report(self, loads: Sequence[LoadSpan] = ()) -> dict[str, Any] | None:
        """The sidecar's ``time_to_first_step``; None until the first step has finished. ``loads``: the
        expert loads so far (`wan.experts.ExpertPool.loads`), the first of them in ``expert_load_s``."""
        if not self.complete:
            return None
        parts: dict[str, float] = {}
        previous = self.origin
        for name, part in MILESTONES:
            parts[part] = self.marks[name] - previous
            previous = self.marks[name]
        parts["first_step"] -= self.load_s
        parts["load"] = self.load_s
        order = ("startup", "validation", "imports", "setup", "text", "conditioning", "load", "first_step")
        return {
            "total_s": round(self.marks["first_step_done"] - self.origin, 4),
            "origin": self.origin_source,
            "parts_s": {part: round(parts[part], 4) for part in order},
            "at_s": {name: round(self.marks[name] - self.origin, 4) for name, _ in MILESTONES},
            "text_s": {part: round(seconds, 4) for part, seconds in self.text_s.items()},
            "device_init_s": None if self.device_init_s is None else round(self.device_init_s, 4),
            "torch_imported_in": self.torch_imported_in,
            "expert_load_s": self._expert_load(loads),
        }

    def _expert_load(self, loads: Sequence[LoadSpan]) -> dict[str, float]:
        """The load of the first step's expert (the process's first load; a second expert loading in
        the background meanwhile is not part of it): in all, alongside the text stage, before the
        denoising began (hidden behind other work), and waited for inside it (the ``load`` part)."""
        m = self.marks
        first = [(start, end) for _, start, end in loads[:1] if start < m["first_step_done"]]
        parts = {
            "total": sum(end - start for start, end in first),
            "with_text": sum(overlap_s(s, e, m["text_start"], m["text_done"]) for s, e in first),
            "before_denoise": sum(overlap_s(s, e, self.origin, m["denoise_start"]) for s, e in first),
            "waited": self.load_s,
        }
        return {part: round(seconds, 4) for part, seconds in parts.items()}


class FirstStepTimer:
    """Marks ``denoise_start`` and ``first_step_done`` on a clock from inside the sampling loop.

    ``start()`` runs with the device idle (the denoise stage synchronises before it); ``step_done()`` is
    called after each step and acts on the first only. On CUDA it records an event there and ``finish()``
    (after the stage's closing synchronisation) converts the event's time to the host clock.
    """

    def __init__(self, clock: StartupClock | None, device: torch.device):
        self.clock = clock if clock is not None and "first_step_done" not in clock.marks else None
        self.cuda = device.type == "cuda"
        self._start_event = self._end_event = None
        self._start = 0.0
        self._host_end: float | None = None
        self._load_s = 0.0

    def start(self) -> None:
        if self.clock is None:
            return
        self._start = time.perf_counter()
        if self.cuda:
            import torch

            self._start_event = torch.cuda.Event(enable_timing=True)
            self._start_event.record()

    def step_done(self, load_s: float) -> None:
        """After a step; ``load_s``: the expert loading so far in this denoising (host-timed, synchronised)."""
        if self.clock is None or self._host_end is not None or self._end_event is not None:
            return
        self._load_s = load_s
        if self.cuda:
            import torch

            self._end_event = torch.cuda.Event(enable_timing=True)
            self._end_event.record()
        else:
            self._host_end = time.perf_counter()

    def finish(self) -> None:
        """With the device synchronised: put the first step's end on the clock."""
        if self.clock is None:
            return
        if self._end_event is not None and self._start_event is not None:
            self._host_end = self._start + self._start_event.elapsed_time(self._end_event) / 1000
        if self._host_end is None:
            return  # no step ran (e.g. interrupted)
        self.clock.mark("denoise_start", self._start)
        self.clock.load_s = self._load_s
        self.clock.mark("first_step_done", self._host_end)


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Summary rows of one video: the text stage's parts, then the time to first step with its parts."""
    rows = []
    text = result.get("text_stage_s")
    if text:
        rows.append(("text stage", ", ".join(f"{part} {seconds:.2f}" for part, seconds in text.items())))
    report = result.get("time_to_first_step")
    if report:
        parts = ", ".join(f"{part} {seconds:.2f}" for part, seconds in report["parts_s"].items())
        rows.append(("time to first step", f"{report['total_s']:.2f} ({parts})"))
        loads = report.get("expert_load_s")
        if loads and loads["total"]:
            rows.append(
                (
                    "expert load",
                    f"{loads['total']:.2f} ({loads['with_text']:.2f} alongside the text stage, "
                    f"{loads['waited']:.2f} waited for)",
                )
            )
    return rows
