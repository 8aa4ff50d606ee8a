"""MagCache for one generation: the cache object built from a request, and its report.

`build_cache` returns a ResidualCache following a Plan (skipping), a CalibrationRecorder (dense run
recording the ratios), or None. `TimedCache` times the block stack of computed calls, so the report
can give an *estimated* speedup: the dense time is modelled as the denoising time plus, for each
skipped call, the mean block-stack time of a computed call. It is a model, not a measurement (it can
never exceed the ideal speedup); `--magcache-verify` measures the real one against a dense run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from magcache_generate.atomic import atomic_write_file
from magcache_generate.magcache.calibration import CalibrationRecorder, CalibrationRecording, average
from magcache_generate.magcache.plan import Plan
from magcache_generate.magcache.report import render_plan, round_speedup
from magcache_generate.magcache.residual_cache import ResidualCache

ESTIMATED_SPEEDUP_METHOD = (
    "estimate, not a measurement: (denoise time + skipped calls x mean block-stack time of a computed call) "
    "/ denoise time; it assumes a skipped call saves exactly one block stack. --magcache-verify measures it"
)


class TimedCache:
    """Wraps a cache and times the block stack of computed calls without waiting for the device.

    On CUDA a pair of timing events is recorded around each block stack and read only by
    ``block_seconds()``, after the stage (one synchronisation, on the last event); on the CPU the
    work is synchronous and ``perf_counter`` is read directly. A batched CFG step (one block stack for
    n branches) counts as n computed calls of 1/n of its time each, so the per-call figures (and the
    estimated speedup built on them) mean the same with and without batching.
    """

    def __init__(self, inner: ResidualCache | CalibrationRecorder):
        self.inner = inner
        self._cpu_seconds: list[float] = []
        self._cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []  # (start, end, calls)
        self._calls = 1  # DiT calls the next run() serves (the branches of a batched step)

    def begin_call(self, step: int, branch: str, expert: str) -> None:
        self.inner.begin_call(step, branch, expert)
        self._calls = 1

    def batchable(self, step: int, branches: tuple[str, ...], expert: str) -> bool:
        return self.inner.batchable(step, branches, expert)

    def begin_batched_call(self, step: int, branches: tuple[str, ...], expert: str) -> None:
        self.inner.begin_batched_call(step, branches, expert)
        self._calls = len(branches)

    def run(self, h: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        calls, self._calls = self._calls, 1

        def timed(x: torch.Tensor) -> torch.Tensor:
            if x.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = blocks(x)
                end.record()
                self._cuda_events.append((start, end, calls))
                return out
            begin = time.perf_counter()
            out = blocks(x)
            self._cpu_seconds += [(time.perf_counter() - begin) / calls] * calls
            return out

        return self.inner.run(h, timed)

    def block_seconds(self) -> list[float]:
        """Block-stack seconds of every computed call so far (a batched stack shared equally by its
        calls); call it after the stage, not inside it."""
        if self._cuda_events:
            self._cuda_events[-1][1].synchronize()  # events complete in order: the last one covers all
        cuda = [
            start.elapsed_time(end) / 1000 / calls
            for start, end, calls in self._cuda_events
            for _ in range(calls)
        ]
        return self._cpu_seconds + cuda

    def release(self) -> None:
        """Free the tensors the cache holds (before the VAE decode)."""
        self.inner.release()


@dataclass
class CalibrationCollector:
    """Recordings of the dense calibration runs of a batch, averaged into one file at the end."""

    path: Path
    recordings: list[CalibrationRecording] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def save(self) -> dict:
        data = average(self.recordings).to_json({**self.provenance, "prompts": self.prompts})
        atomic_write_file(
            self.path,
            lambda tmp: tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n"),
            overwrite=True,
        )
        return data


def build_cache(request, plan: Plan | None, reporter, token_statistics=None) -> TimedCache | None:
    """The cache of one generation: a recorder for --magcache-calibrate, a ResidualCache following
    `plan` (made once per request, before anything loaded) with --use-magcache, else None.
    `token_statistics`: the calibration's reduction over a sharded sequence (None: one process)."""
    options = request.magcache
    if options.calibrate_file is not None:
        return TimedCache(CalibrationRecorder(token_statistics))
    if plan is None:
        return None
    if options.speedup is not None:
        reporter.log(
            f"MagCache: --magcache-speedup {options.speedup:g} -> threshold {plan.config.thresh:.6g}"
        )
    reporter.log(render_plan(plan))
    return TimedCache(ResidualCache(plan))


def finish_cache(cache: TimedCache | None, request, denoise_seconds: float) -> dict | None:
    """The report for the sidecar and the summary table (None without MagCache)."""
    if cache is None or not isinstance(cache.inner, ResidualCache):
        return None
    p = cache.inner.plan
    counts = cache.inner.report()
    calls = [
        {"expert": expert, "branch": branch, **c}
        for expert, branches in counts.items()
        for branch, c in branches.items()
    ]
    skipped = sum(c["skipped"] for c in calls)
    block_seconds = cache.block_seconds()
    mean_block = sum(block_seconds) / len(block_seconds) if block_seconds else 0.0
    dense_estimate = denoise_seconds + skipped * mean_block
    return {
        "mode": p.mode,
        "thresh": p.config.thresh,
        "K": p.config.K,
        "retention_ratio": p.config.retention,
        "curve": p.curve_key,
        "calls": calls,
        "forwards": p.forwards,
        "dense_forwards": p.dense_forwards,
        "ideal_speedup": round_speedup(p.ideal_speedup),
        "estimated_speedup": round_speedup(dense_estimate / denoise_seconds) if denoise_seconds > 0 else None,
        "estimated_speedup_method": ESTIMATED_SPEEDUP_METHOD,
        "warnings": list(p.warnings),
        "no_skip_reason": p.no_skip_reason,
    }
