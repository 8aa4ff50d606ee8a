"""One video from prepared inputs: denoise (the one sampling loop), decode, write.

`generate_one` (run.py) calls `render_video` once, or twice with --magcache-verify (dense reference,
then MagCache) on the same `SamplingInputs`. The denoising time is read with the device synchronised
and excludes expert loads and moves, so two runs can be compared.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from magcache_generate.magcache.session import TimedCache
from magcache_generate.magcache.verify import synchronize
from magcache_generate.progress import Reporter
from magcache_generate.request import Request
from magcache_generate.video_io import to_uint8_frames, write_frames_png, write_mp4
from wan.conditioning import Conditioning
from wan.sampling import ModelProvider, StepInfo, sample
from wan.schedule import Schedule

if TYPE_CHECKING:
    from magcache_generate.run import Components


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


def autocast_for(components: Components) -> AbstractContextManager:
    """bf16 autocast for float32 parameters on CUDA (upstream's default regime); nothing otherwise."""
    if components.device.type == "cuda" and components.dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def render_video(
    components: Components,
    request: Request,
    reporter: Reporter,
    inputs: SamplingInputs,
    cache: TimedCache | None,
    *,
    save_file: Path,
    save_frames: Path | None,
    label: str = "denoising",
) -> Rendered:
    """Denoise, decode and write one video; the denoising time is device-synchronised, loads excluded."""
    timings: dict[str, float] = {}
    task, device = components.task, components.device
    denoise = reporter.task(label, total=len(inputs.schedule))
    dit_calls = {"cond": 0, "uncond": 0}

    def on_step(info: StepInfo) -> None:
        for branch in info.branches:
            dit_calls[branch] += 1
        reporter.advance(denoise, detail=f"t={info.timestep:g} {info.expert} cfg {info.guide_scale:g}")

    experts = _MeteredExperts(components.dit_runtime.models(components.experts), device)
    compile_before = components.dit_runtime.compile_seconds
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with autocast_for(components):
        latent = sample(
            inputs.noise,
            inputs.schedule,
            experts,
            inputs.context,
            inputs.context_null,
            guide_scale=request.guide_scale,
            boundary=task.boundary,
            conditioning=inputs.conditioning,
            cache=cache,
            on_step=on_step,
        )
    synchronize(device)
    denoise_cpu_s = time.process_time() - cpu_start - experts.cpu_seconds
    compile_s = components.dit_runtime.compile_seconds - compile_before
    timings["load_transformer"] = experts.seconds
    if request.compile:
        timings["compile"] = compile_s
    timings["denoise"] = time.perf_counter() - start - experts.seconds - compile_s

    if components.offload:
        components.experts.offload_all()
    start = time.perf_counter()
    with reporter.stage("decoding video"):
        video = components.vae().decode(latent, tiled=request.vae_tiled)[0]
    timings["decode"] = time.perf_counter() - start

    start = time.perf_counter()
    frames = to_uint8_frames(video.cpu())
    with reporter.stage("writing video"):
        write_mp4(frames, save_file, fps=task.fps, crf=request.crf, overwrite=request.overwrite)
        if save_frames is not None:
            write_frames_png(frames, save_frames, overwrite=request.overwrite)
    timings["write"] = time.perf_counter() - start
    return Rendered(tuple(frames.shape), timings, denoise_cpu_s, dit_calls, compile_s)
