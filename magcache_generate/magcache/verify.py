"""``--magcache-verify``: measure MagCache against a dense run of the same request, instead of modelling it.

Protocol (run.py drives it; every step shares the prompt encodings, the seed's noise and the loaded
models):

1. warm-up: one untimed conditional forward of the first expert at the run's latent shape, so that
   one-time costs (CUDA context and kernel selection, allocator growth, the RoPE table of this latent
   grid, first-touch of host pages) are paid before either timed run;
2. the dense run (no cache), decoded and written to ``<stem>.dense.mp4``;
3. the MagCache run, written to the requested file.

Each denoising stage is timed on the host clock with the device synchronised before the clock is read
at both ends, expert loads and moves excluded. Dense first: whatever drift remains (GPU clocks and
heat, allocator fragmentation) then falls on the MagCache run, so the measured speedup errs low, never
high. Quality is computed on the two SAVED videos, decoded by the same function as
``magcache-generate compare`` (so the figures equal that command's on the same files): it includes the
H.264 encoding of both, as anyone watching the files sees them.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from magcache_generate.compare import compare_files
from magcache_generate.magcache.report import round_speedup
from wan.cfg_batch import repeat_batch, stack_contexts
from wan.conditioning import Conditioning
from wan.guidance import guide_scale_for, uses_cfg
from wan.sampling import ModelProvider
from wan.schedule import Schedule, expert_for

RUN_ORDER = "warm-up forward, dense, MagCache"
MEASURED_SPEEDUP_METHOD = (
    "measured: dense denoising seconds / MagCache denoising seconds, same request and seed, both timed "
    "with the device synchronised before each clock reading, expert loads excluded; run order "
    f"{RUN_ORDER} (drift penalises MagCache)"
)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: only at stage boundaries, never inside a step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(
    models: ModelProvider,
    noise: torch.Tensor,
    schedule: Schedule,
    context: torch.Tensor,
    conditioning: Conditioning,
    *,
    boundary: float | None,
    autocast: AbstractContextManager,
    device: torch.device,
    cfg_batch: bool = False,
    guide_scale: tuple[float, float] | None = None,
) -> float:
    """One untimed conditional forward of the schedule's first expert; returns its seconds (loading that
    expert included: the dense run would otherwise load it, outside its timing too). With `cfg_batch`
    and CFG on that expert (`guide_scale`), the forward has the batched CFG step's shape (batch 2)."""
    start = time.perf_counter()
    t = int(schedule.timesteps[0])
    expert = expert_for(t, boundary)
    model = models.activate(expert)
    x, y = conditioning.impose(noise), conditioning.y
    if cfg_batch and guide_scale is not None and uses_cfg(guide_scale_for(expert, guide_scale)):
        x, context = repeat_batch(x, 2), stack_contexts([context, context])
        y = None if y is None else repeat_batch(y, 2)
    with torch.inference_mode(), autocast:
        model(x, conditioning.model_timestep(t, x), context, y)
    synchronize(device)
    return time.perf_counter() - start


def verify_report(
    *,
    dense_file: Path,
    magcache_file: Path,
    dense_seconds: dict[str, float],
    magcache_denoise_s: float,
    warmup_s: float,
    ideal_speedup: float,
    cpu_seconds: tuple[float, float] | None = None,
) -> dict:
    """The ``verify`` entry of the MagCache report: measured speedup and quality on the saved files."""
    start = time.perf_counter()
    quality = compare_files(dense_file, magcache_file)
    dense_denoise_s = dense_seconds["denoise"]
    measured = dense_denoise_s / magcache_denoise_s if magcache_denoise_s > 0 else None
    report = {
        "dense_file": str(dense_file),
        "measured_speedup": None if measured is None else round_speedup(measured),
        "fraction_of_ideal": None if measured is None else round(measured / ideal_speedup, 4),
        "dense_denoise_s": round(dense_denoise_s, 4),
        "magcache_denoise_s": round(magcache_denoise_s, 4),
        "dense_timings_s": {k: round(v, 4) for k, v in dense_seconds.items()},
        "warmup_s": round(warmup_s, 4),
        "method": MEASURED_SPEEDUP_METHOD,
        "quality_vs_dense": quality.to_json(),
    }
    if cpu_seconds is not None:  # CPU runs: process CPU time too, which other jobs on the host disturb less
        dense_cpu, magcache_cpu = cpu_seconds
        report["cpu_time"] = {
            "dense_denoise_s": round(dense_cpu, 4),
            "magcache_denoise_s": round(magcache_cpu, 4),
            "speedup": round_speedup(dense_cpu / magcache_cpu) if magcache_cpu > 0 else None,
        }
    report["quality_s"] = round(time.perf_counter() - start, 4)
    return report
