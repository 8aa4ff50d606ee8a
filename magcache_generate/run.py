"""Orchestration only: plan the run, hold its models, then per request condition -> denoise -> decode ->
write. The decisions are made by `run_plan` (once per run, once per request), the models are held by
`models.Models`, the sample is conditioned by `conditioner.Conditioner`.

Heavy imports (torch, transformers, wan.modules) happen here, never at CLI import time.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.markup import escape

from magcache_generate.conditioner import Conditioner
from magcache_generate.magcache.calibration import CalibrationRecorder
from magcache_generate.magcache.session import CalibrationCollector, TimedCache, build_cache, finish_cache
from magcache_generate.magcache.verify import verify_report, warm_up
from magcache_generate.metering import StageMeter
from magcache_generate.models import Models
from magcache_generate.progress import Reporter, print_result
from magcache_generate.record import result_record
from magcache_generate.render import Rendered, SamplingInputs, autocast_for, render_video
from magcache_generate.reproduce import sidecar_extras
from magcache_generate.request import OutOfMemory, Request
from magcache_generate.run_plan import RequestPlan, RunPlan, magcache_plans, plan_request
from magcache_generate.startup import StartupClock
from magcache_generate.video_io import write_sidecar

if TYPE_CHECKING:
    from magcache_generate.magcache.plan import Plan
    from magcache_generate.parallel import RankRuntime

# A batch item whose run left the device unusable: the later items are not run.
NOT_RUN = "not run: an earlier item left the GPU in an error state (restart the command)"


def generate_one(
    models: Models,
    plan: RequestPlan,
    reporter: Reporter,
    *,
    batch: bool,
    calibration: CalibrationCollector | None = None,
    startup: StartupClock | None = None,
) -> dict[str, Any]:
    """One video: returns the result record (also written as the JSON sidecar). ``startup``: the
    process's clock; the item that runs the process's first denoising step reports its time to it."""
    request = plan.request
    started, started_at = time.perf_counter(), datetime.now().astimezone().isoformat(timespec="seconds")
    meter = StageMeter(plan.run.device)  # synchronised stage times, GPU peaks per stage, host peak
    first_item = startup is not None and "first_step_done" not in startup.marks
    conditioned = Conditioner(plan.run, models).condition(
        plan, meter, reporter, keep_encoder=batch, startup=startup
    )
    timings = dict(conditioned.timings)
    parallel = plan.run.parallel
    sequence = parallel.sequence if parallel is not None else None
    statistics = sequence.token_statistics if sequence is not None else None  # calibration over shards
    cache = build_cache(request, plan.magcache, reporter, statistics)
    dense = None
    if request.dense_save_file is not None:  # --magcache-verify: warm-up, then the dense reference
        dense = render_dense_reference(models, plan, reporter, conditioned.inputs, meter, timings, startup)
    rendered = render_video(
        models,
        plan,
        reporter,
        conditioned.inputs,
        cache,
        meter=meter,
        save_file=request.save_file,
        save_frames=request.save_frames,
        startup=startup,
    )
    timings.update(rendered.timings)
    first_step = startup.report(models.experts.loads) if first_item and startup is not None else None
    result = result_record(plan, rendered, conditioned, meter, first_step)
    magcache_report = finish_cache(cache, request, timings["denoise"])
    if magcache_report is not None and parallel is not None:  # the other CFG half's branch too
        magcache_report["calls"] = parallel.merge_magcache_calls(magcache_report["calls"])
    if magcache_report is not None:
        if dense is not None and plan.run.writer:  # the videos it compares exist on the writer only
            with reporter.stage("verify: PSNR/SSIM vs dense"):
                add_verification(magcache_report, plan, dense, rendered, timings)
        result["magcache"] = magcache_report
    result["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    if calibration is not None:
        collect_calibration(calibration, cache, plan, result["dtype"])
    if parallel is not None:  # every rank of the replica takes part (its peak memory is gathered)
        result["parallel"] = parallel.sidecar_record(result["peak_memory"])
    result.update(sidecar_extras(request, started_at, time.perf_counter() - started))
    if request.sidecar and plan.run.writer:
        write_sidecar(request.save_file, result, overwrite=request.overwrite)
    return result


def render_dense_reference(
    models: Models,
    plan: RequestPlan,
    reporter: Reporter,
    inputs: SamplingInputs,
    meter: StageMeter,
    timings: dict[str, float],
    startup: StartupClock | None,
) -> Rendered:
    """--magcache-verify: one warm-up forward, then the dense video the MagCache one is measured against."""
    request, run = plan.request, plan.run
    with reporter.stage("verify: warm-up forward"):
        timings["verify_warmup"] = warm_up(
            models.dit(),
            inputs.noise,
            inputs.schedule,
            inputs.context,
            inputs.conditioning,
            boundary=run.task.boundary,
            autocast=autocast_for(run),
            device=run.device,
            cfg_batch=run.cfg_batch.batched,
            guide_scale=request.guide_scale,
        )
    dense = render_video(
        models,
        plan,
        reporter,
        inputs,
        None,
        meter=meter,
        stage_prefix="verify_dense_",
        save_file=request.dense_save_file,
        save_frames=None,
        label="denoising (dense reference)",
        startup=startup,
    )
    timings["verify_dense"] = sum(dense.timings.values())
    return dense


def add_verification(
    report: dict[str, Any], plan: RequestPlan, dense: Rendered, rendered: Rendered, timings: dict[str, float]
) -> None:
    """The measured speedup and PSNR/SSIM of the MagCache video against the dense one, into `report`."""
    request = plan.request
    verified = verify_report(
        dense_file=request.dense_save_file,
        magcache_file=request.save_file,
        dense_seconds=dense.timings,
        magcache_denoise_s=timings["denoise"],
        cpu_seconds=(dense.denoise_cpu_s, rendered.denoise_cpu_s) if plan.run.device.type == "cpu" else None,
        warmup_s=timings["verify_warmup"],
        ideal_speedup=report["ideal_speedup"],
    )
    timings["verify_quality"] = verified.pop("quality_s")
    report["measured_speedup"] = verified["measured_speedup"]
    report["verify"] = verified


def collect_calibration(
    calibration: CalibrationCollector, cache: TimedCache | None, plan: RequestPlan, dtype: str
) -> None:
    """--magcache-calibrate: this dense run's recorded ratios, and the settings they hold for."""
    if cache is None or not isinstance(cache.inner, CalibrationRecorder):
        return
    request, task = plan.request, plan.run.task
    calibration.recordings.append(cache.inner.recording())
    calibration.prompts.append(request.prompt)
    calibration.provenance = {
        "task": task.name,
        "steps": len(plan.schedule),
        "shift": request.sample_shift,
        "size": request.size,
        "solver": request.sample_solver,
        "guide_scale": list(request.guide_scale),  # 1 on an expert: a CFG-free (cond-only) calibration
        "dtype": dtype,
        "has_image": request.image is not None,
        "boundary": task.boundary,
    }


def out_of_memory(request: Request, err: BaseException) -> OutOfMemory:
    """One actionable line instead of torch's paragraph: the flags not yet used that lower the peak."""
    first = str(err).strip().split(". ")[0]
    flags = [
        flag
        for flag, used in (
            ("--offload-model", request.offload_model),
            ("--convert-model-dtype", request.convert_model_dtype),
            ("--t5-cpu", request.t5_cpu),
            ("--vae-tiled", request.vae_tiled),
        )
        if not used
    ]
    advice = f"add {' '.join(flags)}, or " if flags else ""
    given = "" if request.gpu_memory is None else f" than {request.gpu_memory:g}"
    budget = f"a smaller --gpu-memory{given} (the memory plan's estimate was short), "
    return OutOfMemory(f"out of memory ({first}); {advice}{budget}or lower --size or --frame-num")


def is_sticky_device_error(err: BaseException) -> bool:
    """Whether `err` is a CUDA error that stays with the context (an illegal access, a device-side
    assert, a lost device): every later kernel launch fails too. An out-of-memory is not one."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and "CUDA error" in message and "out of memory" not in message


PROMPT_ECHO = 60  # characters of the prompt echoed before a run (the line stays under 100)


def short_prompt(prompt: str, limit: int = PROMPT_ECHO) -> str:
    """The prompt on one line, quoted, cut with an ellipsis when longer than `limit`."""
    flat = " ".join(prompt.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…")


def run_requests(
    requests: list[Request],
    *,
    console: Console,
    debug: bool = False,
    batch: bool | None = None,
    magcache: list[Plan | None] | None = None,
    startup: StartupClock | None = None,
    parallel: RankRuntime | None = None,
) -> list[dict[str, Any]]:
    """Generate every request with models loaded once; in a batch (default: more than one request) a
    failing item is reported and skipped, and a GPU error that outlives its item stops the batch (the
    later items are reported as not run). `magcache`: each request's MagCache plan, as checked before
    loading (planned here when not given). The caller prints the closing batch table.

    Under torchrun (`parallel`) a failing item ends the run when its ranks work on it together (a
    Ulysses or CFG group): the other ranks of the group could not go on without it."""
    if not requests:
        return []
    batch = len(requests) > 1 if batch is None else batch
    magcache = magcache_plans(requests) if magcache is None else magcache
    results: list[dict[str, Any]] = []
    with Reporter(console) as reporter:
        # --magcache-verify returns to the first expert for its second run: keep parked experts, as a batch
        verify = any(r.magcache.verify for r in requests)
        run = RunPlan.build(requests, keep_inactive=batch or verify, magcache=magcache, parallel=parallel)
        if run.memory is not None:
            reporter.log(run.memory.render())
        reporter.log(run.host.render())
        if run.device.type == "cpu":
            from magcache_generate.cpu_estimate import cpu_notice

            reporter.log(escape(cpu_notice(requests, magcache, run.dit_config, requests[0].device)))
        models = Models(run, requests[0], reporter)
        calibrate_file = requests[0].magcache.calibrate_file
        calibration = CalibrationCollector(calibrate_file) if calibrate_file is not None else None
        stopped = False  # a GPU error outlived its item: the device is unusable for the rest
        for request, plan in zip(requests, magcache, strict=True):
            if stopped:
                results.append(
                    {"task": request.task, "seed": request.base_seed, "error": NOT_RUN, "not_run": True}
                )
                continue
            reporter.log(
                f"[bold]{request.task}[/] seed {request.base_seed}: {escape(short_prompt(request.prompt))}"
            )
            start = time.perf_counter()
            try:
                try:
                    planned = plan_request(request, run, plan)
                    result = generate_one(
                        models, planned, reporter, batch=batch, calibration=calibration, startup=startup
                    )
                except torch.cuda.OutOfMemoryError as err:  # also torch.OutOfMemoryError
                    raise out_of_memory(request, err) from None
            except KeyboardInterrupt:
                raise
            except Exception as err:
                if debug or not batch or (parallel is not None and parallel.layout.group_size > 1):
                    raise
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                reporter.log(f"[red]item failed[/]: {escape(message)}")
                result = {"task": request.task, "seed": request.base_seed, "error": message}
                stopped = is_sticky_device_error(err)
                if stopped:
                    reporter.log(f"[red]stopping the batch[/]: {NOT_RUN.removeprefix('not run: ')}")
            result["total_s"] = time.perf_counter() - start
            results.append(result)
            if result.get("error") is None:
                print_result(console, result)
        if calibration is not None and parallel is not None:  # every replica's recordings, on rank 0
            parallel.merge_calibration(calibration)
        if calibration is not None and calibration.recordings and (parallel is None or parallel.is_main):
            calibration.save()
            reporter.log(
                f"MagCache calibration over {len(calibration.recordings)} prompt(s) written to {calibration.path}; "
                f"use it with --use-magcache --magcache-ratios {calibration.path}"
            )
    return results
