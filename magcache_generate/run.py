"""Orchestration only: load components once, then per request encode -> sample -> decode -> write.

Heavy imports (torch, transformers, wan.modules) happen here, never at CLI import time.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

import wan
from magcache_generate import __version__
from magcache_generate.budget import plan_run
from magcache_generate.cfg_batching import decide_cfg_batch
from magcache_generate.dit_runtime import DitRuntime
from magcache_generate.loras import expert_specs, lora_records
from magcache_generate.magcache.calibration import CalibrationRecorder
from magcache_generate.magcache.session import CalibrationCollector, build_cache, finish_cache
from magcache_generate.magcache.verify import verify_report, warm_up
from magcache_generate.metering import StageMeter
from magcache_generate.progress import Reporter, print_result
from magcache_generate.quantization import resolve_fp8_matmul
from magcache_generate.render import Rendered, SamplingInputs, autocast_for, render_video
from magcache_generate.request import OutOfMemory, Request
from magcache_generate.startup import StartupClock
from magcache_generate.text_stage import encode_timed, initialise_device, load_text_side
from magcache_generate.video_io import read_image, write_sidecar
from wan.conditioning import Conditioning, i2v_mask, i2v_video
from wan.configs import SIZES, TASKS, TaskConfig, max_area
from wan.experts import ExpertPool
from wan.image_prep import i2v_first_frame, ti2v_first_frame
from wan.loading import locate_transformer_files, read_layout, read_transformer_config
from wan.schedule import make_schedule
from wan.weight_storage import WeightStorage


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class Components:
    """Models shared by every request of a batch (same task and checkpoint), loaded lazily."""

    def __init__(
        self, first: Request, reporter: Reporter, *, batch: bool, requests: list[Request] | None = None
    ):
        self.task: TaskConfig = TASKS[first.task]
        self.files = first.weight_paths  # each part's file or folder (--ckpt-dir or its own flag)
        self.device = resolve_device(first.device)
        self.device_init_s = initialise_device(self.device)  # CUDA context, reported on its own
        # --convert-model-dtype: bf16 parameters (upstream regime b). Otherwise float32 parameters, run
        # under bf16 autocast on CUDA (upstream regime a) and in plain float32 on CPU (the goldens' regime).
        self.dtype = torch.bfloat16 if first.convert_model_dtype else torch.float32
        # per-parameter storage: under autocast the Linears it casts to bf16 are stored in bf16 (exact)
        # --quantize fp8: block Linears stored fp8; --fp8-matmul: multiplied in fp8 where the GPU can
        # fp8 DiT files keep their fp8 block Linears (as --quantize fp8 would, with the file's bytes)
        file_fp8 = self.files.dit_fp8
        quantize = first.quantize or ("fp8" if file_fp8 else None)
        fp8_matmul = resolve_fp8_matmul(first.fp8_matmul, quantize, self.device)
        self.weights = WeightStorage.for_run(self.dtype, self.device, quantize, fp8_matmul)
        if file_fp8:
            self.weights = self.weights.keeping_file_fp8(file_fp8)
        self.offload = first.offload_model
        self.reporter = reporter
        self.dit_runtime = DitRuntime.for_request(first, self.device)  # --attention, --compile
        dits = self.files.dits
        paths = (
            {"single": dits[""]}
            if not self.task.two_experts
            else {"high": dits[self.task.high_noise_checkpoint], "low": dits[self.task.low_noise_checkpoint]}
        )
        self.dit_config = read_transformer_config(next(iter(paths.values())))
        # The memory plan, from headers and shapes only: an infeasible budget stops here, before loading.
        self.memory = plan_run(requests or [first], self.dit_config, self.device, batch=batch)
        if self.memory is not None:
            reporter.log(self.memory.render())
        self.cfg_batch = decide_cfg_batch(requests or [first], self.device.type, self.memory)  # --cfg-batch
        t5_cpu = first.t5_cpu or (self.memory is not None and self.memory.plan.t5_on_cpu)
        self.t5_device = torch.device("cpu") if t5_cpu else self.device
        self.experts = ExpertPool(
            paths,
            dtype=self.dtype,
            storage=self.weights,
            device=self.device,
            offload=self.offload,
            keep_inactive=batch,
            on_load=self._start_loading,
            on_shard=lambda shard: reporter.advance(self._loading_task, detail=shard.name),
            loras=expert_specs(first.loras, list(paths)),  # merged as each expert loads
            placement=self.memory.placement() if self.memory is not None else None,
            on_warning=lambda message: reporter.log(f"[yellow]warning[/]: {message}"),
        )
        self._loading_task = 0
        self._text_encoder = None
        self._tokenizer = None
        self.text_parts: dict[str, float] = {}  # the current item's text stage, in parts
        self.contexts: dict[tuple[str, int], torch.Tensor] = {}  # encoded prompts, reused by a batch
        self._vae = None
        self.load_seconds = 0.0

    def _start_loading(self, expert: str, path: Path) -> None:
        """A progress bar per expert load, advanced shard by shard."""
        files = locate_transformer_files(path)
        shards = len(files.shards)
        layout, _ = read_layout(files)  # headers only; says what a single file holds
        stored = "" if layout.identity else f"; {layout.describe()}"
        self._loading_task = self.reporter.task(f"loading {expert} transformer", total=shards)
        self.reporter.log(f"loading {expert} transformer from {path} ({shards} shard(s){stored})")

    def text_encoder(self):
        if self._text_encoder is None:
            start = time.perf_counter()
            with self.reporter.stage("loading text encoder"):
                # upstream runs the umT5 encoder in bf16, on CPU too (--t5_cpu)
                self._text_encoder, self._tokenizer = load_text_side(
                    self.files.t5,
                    self.files.tokenizer,
                    device=self.t5_device,
                    parts=self.text_parts,
                )
            self.load_seconds += time.perf_counter() - start
        return self._text_encoder, self._tokenizer

    def vae(self):
        if self._vae is None:
            start = time.perf_counter()
            with self.reporter.stage("loading VAE"):
                self._vae = wan.load_vae(self.files.vae, device=self.device)
            self.load_seconds += time.perf_counter() - start
        return self._vae

    def park_text_encoder(self, keep: bool) -> None:
        """upstream offload_model: the T5 leaves the accelerator after encoding."""
        if self._text_encoder is None or not self.offload or self.t5_device.type == "cpu":
            return
        if keep:
            self._text_encoder.to("cpu")
        else:
            self._text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def encode_prompts(components: Components, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
    encoder, tokenizer = components.text_encoder()
    if components._text_encoder is not None and encoder.device != components.t5_device:
        encoder.to(components.t5_device)
    text_len = components.dit_config.text_len
    # two separate batch-1 calls, as upstream; each runs on its prompt's real tokens only
    parts, known = components.text_parts, components.contexts
    context = encode_timed(encoder, tokenizer, [prompt], text_len, parts, known)[0]
    context_null = encode_timed(encoder, tokenizer, [negative], text_len, parts, known)[0]
    return context[None].to(components.device), context_null[None].to(components.device)


def prepare_latents(
    components: Components, request: Request, generator: torch.Generator
) -> tuple[torch.Tensor, Conditioning, tuple[int, int]]:
    """Initial noise [1, C, T, H, W], the task's conditioning and the output (width, height)."""
    task, device = components.task, components.device
    z_dim = components.dit_config.out_dim
    t_lat = (request.frame_num - 1) // task.vae_stride[0] + 1
    stride = task.vae_stride[1]
    if request.image is None:
        width, height = SIZES[request.size]
        shape = (z_dim, t_lat, height // stride, width // stride)
        noise = torch.randn(shape, dtype=torch.float32, generator=generator, device=device)[None]
        return noise, Conditioning(), (width, height)
    image = read_image(request.image)
    vae = components.vae()
    if task.name == "i2v-A14B":
        frame = i2v_first_frame(image, max_area(request.size), stride)
        h, w = frame.shape[1:]
        noise = torch.randn(
            (16, t_lat, h // stride, w // stride), dtype=torch.float32, generator=generator, device=device
        )
        z = vae.encode(i2v_video(frame, request.frame_num)[None])  # the clip stays on the host
        y = torch.cat([i2v_mask(request.frame_num, z.shape[3], z.shape[4]).to(device)[None], z], dim=1)
        return noise[None], Conditioning(y=y), (w, h)
    frame = ti2v_first_frame(image, max_area(request.size), multiple=stride * 2)
    h, w = frame.shape[1:]
    noise = torch.randn(
        (z_dim, t_lat, h // stride, w // stride), dtype=torch.float32, generator=generator, device=device
    )
    z = vae.encode(frame[None, :, None].to(device))
    return noise[None], Conditioning(first_frame=z), (w, h)


def package_versions() -> dict[str, str]:
    import transformers

    return {
        "magcache_generate": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def generate_one(
    components: Components,
    request: Request,
    reporter: Reporter,
    *,
    batch: bool,
    calibration: CalibrationCollector | None = None,
    startup: StartupClock | None = None,
) -> dict[str, Any]:
    """One video: returns the result record (also written as the JSON sidecar). ``startup``: the
    process's clock; the item that runs the process's first denoising step reports its time to it."""

    timings: dict[str, float] = {}
    task = components.task
    device = components.device
    meter = StageMeter(device)  # synchronised stage times, GPU peaks per stage, host peak of this item
    negative = request.negative_prompt if request.negative_prompt is not None else task.negative_prompt

    generator = torch.Generator(device=device).manual_seed(request.base_seed)
    first_item = startup is not None and "first_step_done" not in startup.marks
    if startup is not None:
        startup.device_init_s = components.device_init_s
        startup.mark("text_start")
    components.text_parts = {}
    with meter.stage("encode_text"):
        with reporter.stage("encoding text"):
            context, context_null = encode_prompts(components, request.prompt, negative)
        components.park_text_encoder(keep=batch)
    timings["encode_text"] = meter.seconds["encode_text"]
    text_parts = dict(components.text_parts)
    text_parts["other"] = max(0.0, timings["encode_text"] - sum(text_parts.values()))  # moves, parking
    if startup is not None:
        startup.mark("text_done")
        startup.text_stage(text_parts)

    with meter.stage("encode_image"):
        noise, conditioning, (width, height) = prepare_latents(components, request, generator)
    if request.image is not None:
        timings["encode_image"] = meter.seconds["encode_image"]
    else:
        meter.gpu.pop("encode_image", None)  # only noise was drawn

    schedule = make_schedule(request.sample_solver, request.sample_steps, request.sample_shift)
    inputs = SamplingInputs(noise, schedule, context, context_null, conditioning)
    cache = build_cache(request, schedule, components.dit_config, reporter)
    dense: Rendered | None = None
    if request.dense_save_file is not None:  # --magcache-verify: warm-up, then the dense reference
        with reporter.stage("verify: warm-up forward"):
            warmup = warm_up(
                components.dit_runtime.models(components.experts),
                noise,
                schedule,
                context,
                conditioning,
                boundary=task.boundary,
                autocast=autocast_for(components),
                device=device,
                cfg_batch=components.cfg_batch.batched,
                guide_scale=request.guide_scale,
            )
        timings["verify_warmup"] = warmup
        dense = render_video(
            components,
            request,
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

    rendered = render_video(
        components,
        request,
        reporter,
        inputs,
        cache,
        meter=meter,
        save_file=request.save_file,
        save_frames=request.save_frames,
        startup=startup,
    )
    timings.update(rendered.timings)

    result: dict[str, Any] = {
        "task": task.name,
        "seed": request.base_seed,
        "save_file": str(request.save_file),
        "frames": list(rendered.frames_shape),
        "size_wh": [width, height],
        "fps": task.fps,
        "device": str(device),
        "dtype": str(components.dtype).replace("torch.", ""),
        "weights": components.weights.describe(),
        "precision": {**components.weights.precision(), "text_encoder": "bf16", "vae": "fp32"},
        "steps_run": len(schedule),
        "timings_s": {},
        "text_stage_s": {part: round(seconds, 4) for part, seconds in text_parts.items()},
        "time_to_first_step": startup.report() if first_item and startup is not None else None,
        "peak_memory": meter.peak_memory(),
        "sampling": sampling_record(request, schedule, rendered.dit_calls),
        "loras": lora_records(request.loras, task),
        "attention": components.dit_runtime.report(),
        "compile_s": round(rendered.compile_s, 4) if request.compile else None,
        "cfg_batch": components.cfg_batch.to_json(rendered.cfg_steps["batched"], rendered.cfg_steps["cfg"]),
        "request": _jsonable(dataclasses.asdict(request)),
        "negative_prompt_used": negative,
        "versions": package_versions(),
    }
    if components.memory is not None:
        result["memory_plan"] = components.memory.to_json(request)
    magcache_report = finish_cache(cache, request, timings["denoise"])
    if magcache_report is not None:
        if dense is not None:
            with reporter.stage("verify: PSNR/SSIM vs dense"):
                verified = verify_report(
                    dense_file=request.dense_save_file,
                    magcache_file=request.save_file,
                    dense_seconds=dense.timings,
                    magcache_denoise_s=timings["denoise"],
                    cpu_seconds=(dense.denoise_cpu_s, rendered.denoise_cpu_s)
                    if device.type == "cpu"
                    else None,
                    warmup_s=timings["verify_warmup"],
                    ideal_speedup=magcache_report["ideal_speedup"],
                )
            timings["verify_quality"] = verified.pop("quality_s")
            magcache_report["measured_speedup"] = verified["measured_speedup"]
            magcache_report["verify"] = verified
        result["magcache"] = magcache_report
    result["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    if calibration is not None and cache is not None and isinstance(cache.inner, CalibrationRecorder):
        calibration.recordings.append(cache.inner.recording())
        calibration.prompts.append(request.prompt)
        calibration.provenance = {
            "task": task.name,
            "steps": len(schedule),
            "shift": request.sample_shift,
            "size": request.size,
            "solver": request.sample_solver,
            "guide_scale": list(request.guide_scale),  # 1 on an expert: a CFG-free (cond-only) calibration
            "dtype": result["dtype"],
            "has_image": request.image is not None,
            "boundary": task.boundary,
        }
    if request.sidecar:
        write_sidecar(request.save_file, result, overwrite=request.overwrite)
    return result


def sampling_record(request: Request, schedule, dit_calls: dict[str, int]) -> dict[str, Any]:
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


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


def run_requests(
    requests: list[Request],
    *,
    console: Console,
    debug: bool = False,
    batch: bool | None = None,
    startup: StartupClock | None = None,
) -> list[dict[str, Any]]:
    """Generate every request with models loaded once; in a batch (default: more than one request) a
    failing item is reported and skipped. The caller prints the closing batch table."""
    if not requests:
        return []
    batch = len(requests) > 1 if batch is None else batch
    results: list[dict[str, Any]] = []
    with Reporter(console) as reporter:
        # --magcache-verify returns to the first expert for its second run: keep parked experts, as a batch
        verify = any(r.magcache.verify for r in requests)
        components = Components(requests[0], reporter, batch=batch or verify, requests=requests)
        calibrate_file = requests[0].magcache.calibrate_file
        calibration = CalibrationCollector(calibrate_file) if calibrate_file is not None else None
        for request in requests:
            reporter.log(
                f"[bold]{request.task}[/] seed {request.base_seed}: {escape(repr(request.prompt[:80]))}"
            )
            start = time.perf_counter()
            try:
                try:
                    result = generate_one(
                        components, request, reporter, batch=batch, calibration=calibration, startup=startup
                    )
                except torch.cuda.OutOfMemoryError as err:  # also torch.OutOfMemoryError
                    raise out_of_memory(request, err) from None
            except KeyboardInterrupt:
                raise
            except Exception as err:
                if debug or not batch:
                    raise
                message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                reporter.log(f"[red]item failed[/]: {escape(message)}")
                result = {"task": request.task, "seed": request.base_seed, "error": message}
            result["total_s"] = time.perf_counter() - start
            results.append(result)
            if result.get("error") is None:
                print_result(console, result)
        if calibration is not None and calibration.recordings:
            calibration.save()
            reporter.log(
                f"MagCache calibration over {len(calibration.recordings)} prompt(s) written to {calibration.path}; "
                f"use it with --use-magcache --magcache-ratios {calibration.path}"
            )
    return results
