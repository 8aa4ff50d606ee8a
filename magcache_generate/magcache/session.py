"""MagCache for one generation: the cache object built from a request, and its report.

`build_cache` returns a ResidualCache following a Plan (skipping), a CalibrationRecorder (dense run
recording the ratios), or None. `TimedCache` measures the block-stack time of computed calls so the
report can state the measured speedup: dense time is estimated as the denoising time plus, for each
skipped call, the mean block-stack time of a computed call.
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
from magcache_generate.magcache.report import render_plan
from magcache_generate.magcache.residual_cache import ResidualCache
from magcache_generate.magcache.settings import make_plan


class TimedCache:
    """Wraps a cache and times the block stack of computed calls (synchronising CUDA if needed)."""

    def __init__(self, inner: ResidualCache | CalibrationRecorder):
        self.inner = inner
        self.block_seconds: list[float] = []

    def begin_call(self, step: int, branch: str, expert: str) -> None:
        self.inner.begin_call(step, branch, expert)

    def run(self, h: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        def timed(x: torch.Tensor) -> torch.Tensor:
            _sync(x)
            start = time.perf_counter()
            out = blocks(x)
            _sync(out)
            self.block_seconds.append(time.perf_counter() - start)
            return out

        return self.inner.run(h, timed)

    def release(self) -> None:
        """Free the tensors the cache holds (before the VAE decode)."""
        self.inner.release()


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


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


def build_cache(request, schedule, dit_config, reporter) -> TimedCache | None:
    options = request.magcache
    if options.calibrate_file is not None:
        return TimedCache(CalibrationRecorder())
    if not options.enabled:
        return None
    timesteps = [int(t) for t in schedule.timesteps[: len(schedule)]]
    result = make_plan(
        request.task, timesteps, request.sample_shift, options, request.image is not None, reporter.log
    )
    reporter.log(render_plan(result))
    return TimedCache(ResidualCache(result))


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
    mean_block = sum(cache.block_seconds) / len(cache.block_seconds) if cache.block_seconds else 0.0
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
        "ideal_speedup": round(p.ideal_speedup, 4),
        "measured_speedup": round(dense_estimate / denoise_seconds, 4) if denoise_seconds > 0 else None,
        "measured_speedup_method": "denoise time + skipped calls x mean computed block-stack time, over denoise time",
        "warnings": list(p.warnings),
        "no_skip_reason": p.no_skip_reason,
    }
