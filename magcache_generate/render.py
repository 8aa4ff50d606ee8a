"""One video from prepared inputs: denoise (the one sampling loop), decode, write.

`generate_one` (run.py) calls `render_video` once, or twice with --magcache-verify (dense reference,
then MagCache) on the same `SamplingInputs`. The denoising time is read with the device synchronised
and excludes expert loads and moves, so two runs can be compared.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from magcache_generate.magcache.session import TimedCache
from magcache_generate.magcache.verify import synchronize
from magcache_generate.metering import StageMeter
from magcache_generate.progress import Reporter
from magcache_generate.reproduce import settings_comment
from magcache_generate.startup import FirstStepTimer, StartupClock
from magcache_generate.video_io import to_uint8_frames, write_frames_png, write_mp4
from wan.conditioning import Conditioning
from wan.sampling import ModelProvider, StepInfo, sample
from wan.schedule import Schedule

if TYPE_CHECKING:
    from magcache_generate.models import Models
    from magcache_generate.run_plan import RequestPlan, RunPlan


@dataclass(frozen=True)
class SamplingInputs:
    """What a denoising run starts from; the dense and MagCache runs of --magcache-verify share it."""

    noise: torch.Tensor
    schedule: Schedule
    context: torch.Tensor
    context_null: torch.Tensor
    conditioning: Conditioning


@dataclass(frozen=True)
class Rendered:
    frames_shape: tuple[int, ...]  # [T, H, W, 3] of the uint8 frames written
    timings: dict[str, float]  # load_transformer, [compile,] denoise, decode, write
    denoise_cpu_s: float  # process CPU seconds of the denoising, all threads (less disturbed by other jobs)
    dit_calls: dict[str, int]  # transformer calls per branch (CFG-free steps make no uncond call)
    compile_s: float  # --compile: host seconds spent compiling during this denoising (kept out of denoise)
    cfg_steps: dict[str, int] | None = None  # --cfg-batch: {"cfg": steps with both branches, "batched": ...}


class _MeteredExperts:
    """The expert pool as the loop sees it, timing expert loads and moves so denoising excludes them."""

    def __init__(self, experts: ModelProvider, device: torch.device):
        self.experts, self.device = experts, device
        self.seconds = self.cpu_seconds = 0.0

    def activate(self, expert: str):
        synchronize(self.device)  # once per expert switch, outside any step
        start, cpu_start = time.perf_counter(), time.process_time()
        model = self.experts.activate(expert)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu_start
        return model


def decode_latent(vae, latent: torch.Tensor, tiled: bool, tile_px: int | None) -> torch.Tensor:
    """The VAE decode, tiled when asked (--vae-tiled) or when the memory plan needs it (its tile size)."""
    if tile_px is None:
        return vae.decode(latent, tiled=tiled)[0]
    return vae.decode(latent, tiled=True, tile_size=max(1, tile_px // vae.stride[1]))[0]


def release_cache(cache: Any) -> None:
    release = getattr(cache, "release", None)
    if release is not None:
        release()


def autocast_for(run: RunPlan) -> AbstractContextManager:
    """bf16 autocast for float32 parameters on CUDA (upstream's default regime); nothing otherwise.
    The weight storage decides it: its bf16-stored Linears are exact only under that autocast."""
    return run.weights.autocast_context(run.device)


def render_video(
    models: Models,
    plan: RequestPlan,
    reporter: Reporter,
    inputs: SamplingInputs,
    cache: TimedCache | None,
    *,
    meter: StageMeter,
    save_file: Path,
    save_frames: Path | None,
    label: str = "denoising",
    stage_prefix: str = "",
    startup: StartupClock | None = None,
) -> Rendered:
    """Denoise, decode and write one video. The stage times come from `meter` (device-synchronised, with
    per-stage GPU peaks under `stage_prefix` + denoise/decode); expert loads and compiling are excluded
    from the denoising time. The process's first denoising step is put on ``startup``'s clock."""
    timings: dict[str, float] = {}
    request, run = plan.request, plan.run
    denoise = reporter.task(label, total=len(inputs.schedule))
    dit_calls = {"cond": 0, "uncond": 0}
    cfg_steps = {"cfg": 0, "batched": 0}

    def on_step(info: StepInfo) -> None:
        for branch in info.branches:
            dit_calls[branch] += 1
        cfg_steps["cfg"] += int(len(info.branches) > 1)
        cfg_steps["batched"] += int(info.batched)
        reporter.advance(denoise, detail=f"t={info.timestep:g} {info.expert} cfg {info.guide_scale:g}")
        first_step.step_done(experts.seconds)

    experts = _MeteredExperts(models.dit(), run.device)
    first_step = FirstStepTimer(startup, run.device)
    compile_before = run.dit_runtime.compile_seconds
    denoise_stage = f"{stage_prefix}denoise"
    with meter.stage(denoise_stage), autocast_for(run):
        cpu_start = time.process_time()
        first_step.start()
        latent = sample(
            inputs.noise,
            inputs.schedule,
            experts,
            inputs.context,
            inputs.context_null,
            guide_scale=request.guide_scale,
            boundary=run.task.boundary,
            conditioning=inputs.conditioning,
            cache=cache,
            on_step=on_step,
            cfg_batch=run.cfg_batch.batched,
            cfg_parallel=run.parallel.cfg_exchange if run.parallel is not None else None,
        )
        denoise_cpu_s = time.process_time() - cpu_start - experts.cpu_seconds
    first_step.finish()  # the stage ended synchronised
    compile_s = run.dit_runtime.compile_seconds - compile_before
    timings["load_transformer"] = experts.seconds
    if run.compile.enabled:
        timings["compile"] = compile_s
    timings["denoise"] = meter.seconds[denoise_stage] - experts.seconds - compile_s

    release_cache(cache)  # MagCache's residuals are not needed by the decode: free them first
    models.after_denoise()
    if not run.writer:  # under torchrun one rank per replica decodes and writes
        return Rendered((), timings, denoise_cpu_s, dit_calls, compile_s, cfg_steps)
    decode_stage = f"{stage_prefix}decode"
    with meter.stage(decode_stage), reporter.stage("decoding video"):
        video = decode_latent(models.vae(), latent, request.vae_tiled, plan.decode_tile)
    timings["decode"] = meter.seconds[decode_stage]

    start = time.perf_counter()
    frames = to_uint8_frames(video.cpu())
    with reporter.stage("writing video"):
        comment = settings_comment(request)  # the settings travel with the video
        write_mp4(
            frames, save_file, fps=run.task.fps, crf=request.crf, overwrite=request.overwrite, comment=comment
        )
        if save_frames is not None:
            write_frames_png(frames, save_frames, overwrite=request.overwrite)
    timings["write"] = time.perf_counter() - start
    return Rendered(tuple(frames.shape), timings, denoise_cpu_s, dit_calls, compile_s, cfg_steps)
