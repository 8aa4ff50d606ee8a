"""What plans a run and each of its requests: every decision made once, before any weight loads, and
handed on to the stages that use it (nothing downstream recomputes one).

`RunPlan` holds the decisions shared by a run's requests (device, parameter dtype and storage, the
memory plan, CFG batching, where the text encoder runs, the attention kernel, whether to compile); `RequestPlan` holds one
request's (the distilled recipe's settings are already in the request; the schedule, the MagCache
plan, the decode tile and the memory record). Under torchrun `RunPlan.parallel` is this rank's part of
the run (`parallel.RankRuntime`): the device is the rank's, and each rank plans within its own GPU's
budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from magcache_generate.budget import RunMemory, plan_run
from magcache_generate.cfg_batching import CfgBatch, decide_cfg_batch
from magcache_generate.compile_choice import CompileChoice, decide_compile, request_work
from magcache_generate.dit_runtime import DitRuntime
from magcache_generate.host_memory import plan_host_run
from magcache_generate.plan_check import check_magcache_plan
from magcache_generate.quantization import resolve_fp8_matmul
from magcache_generate.request import Request
from magcache_generate.weight_paths import WeightPaths
from wan.configs import TASKS, TaskConfig
from wan.host_plan import HostPlan
from wan.loading import read_transformer_config
from wan.schedule import Schedule, make_schedule
from wan.weight_storage import WeightStorage

if TYPE_CHECKING:
    from magcache_generate.magcache.plan import Plan
    from magcache_generate.parallel import RankRuntime


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def expert_paths(task: TaskConfig, files: WeightPaths) -> dict[str, Path]:
    """Each expert's checkpoint folder or single file ("single" for one-model tasks)."""
    if not task.two_experts:
        return {"single": files.dits[""]}
    return {"high": files.dits[task.high_noise_checkpoint], "low": files.dits[task.low_noise_checkpoint]}


@dataclass(frozen=True)
class RunPlan:
    """The decisions shared by every request of a run (same task and checkpoint)."""

    task: TaskConfig
    files: WeightPaths  # each part's file or folder (--ckpt-dir, or the part's own flag)
    device: torch.device
    dtype: torch.dtype  # parameters: bf16 with --convert-model-dtype, else float32
    weights: WeightStorage  # per-parameter storage (bf16 Linears under CUDA autocast)
    offload: bool
    keep_inactive: bool  # a batch (or --magcache-verify) keeps parked experts for the next use
    experts: dict[str, Path]
    dit_config: Any
    memory: RunMemory | None  # None: a CPU run (no budget)
    cfg_batch: CfgBatch
    t5_device: torch.device
    compile: CompileChoice  # --compile auto|on|off, decided for the run's forwards
    dit_runtime: DitRuntime  # the attention kernel (checked against the device) and the block compiler
    host: HostPlan  # which loads overlap other work; whether a batch keeps both experts in host memory
    parallel: RankRuntime | None = None  # this rank's part of a torchrun run (None: one process)

    @property
    def writer(self) -> bool:
        """Whether this process decodes and writes (under torchrun: the first rank of its replica)."""
        return self.parallel is None or self.parallel.is_writer

    @property
    def frees_dit_before_decode(self) -> bool:
        """--dit-fsdp for one video: its sharded experts (kept on the device, never offloaded) are freed
        before the decode, as the memory plan counts them (`budget.memory_request`)."""
        return self.parallel is not None and self.parallel.options.dit_fsdp and not self.keep_inactive

    @classmethod
    def build(
        cls,
        requests: list[Request],
        *,
        keep_inactive: bool,
        magcache: list[Plan | None] | None = None,
        parallel: RankRuntime | None = None,
    ) -> RunPlan:
        """Plan the run from the first request's run-wide settings and every request's size.
        `keep_inactive`: a batch, or --magcache-verify (which returns to the first expert). `magcache`:
        each request's MagCache plan (their forwards decide --compile auto; planned here when not given)."""
        first = requests[0]
        task = TASKS[first.task]
        files = first.weight_paths
        device = resolve_device(first.device)
        # --convert-model-dtype: bf16 parameters (upstream regime b). Otherwise float32 parameters, run
        # under bf16 autocast on CUDA (upstream regime a) and in plain float32 on CPU (the goldens' regime).
        dtype = torch.bfloat16 if first.convert_model_dtype else torch.float32
        paths = expert_paths(task, files)
        dit_config = read_transformer_config(next(iter(paths.values())))
        # From headers and shapes only: an infeasible budget stops here, before loading.
        shards = parallel.memory_shards if parallel is not None else (1, 1)
        memory = plan_run(requests, dit_config, device, batch=keep_inactive, shards=shards)
        t5_cpu = first.t5_cpu or (memory is not None and memory.plan.t5_on_cpu)
        plans = magcache_plans(requests) if magcache is None else magcache
        work = [request_work(r, p, dit_config) for r, p in zip(requests, plans, strict=True)]
        compile_choice = decide_compile(first.compile, device.type, work)
        t5_device = torch.device("cpu") if t5_cpu else device
        weights = weight_storage(first, files, dtype, device)
        host = plan_host_run(
            experts=paths,
            storage=weights,
            device=device,
            offload=first.offload_model,
            t5_device=t5_device,
            t5_file=files.t5,
            memory=memory,
            batch=keep_inactive,
        )
        return cls(
            task=task,
            files=files,
            device=device,
            dtype=dtype,
            weights=weights,
            offload=first.offload_model,
            keep_inactive=keep_inactive,
            experts=paths,
            dit_config=dit_config,
            memory=memory,
            cfg_batch=decide_cfg_batch(requests, device.type, memory),
            t5_device=t5_device,
            compile=compile_choice,
            dit_runtime=DitRuntime.for_request(first, device, compile=compile_choice.enabled),
            host=host,
            parallel=parallel,
        )


def weight_storage(
    first: Request, files: WeightPaths, dtype: torch.dtype, device: torch.device
) -> WeightStorage:
    """Per-parameter storage. --quantize fp8: block Linears stored fp8; --fp8-matmul: multiplied in fp8
    where the GPU can. fp8 DiT files keep their fp8 block Linears (as --quantize fp8 would, with the
    file's bytes)."""
    file_fp8 = files.dit_fp8
    quantize = first.quantize or ("fp8" if file_fp8 else None)
    weights = WeightStorage.for_run(
        dtype, device, quantize, resolve_fp8_matmul(first.fp8_matmul, quantize, device)
    )
    return weights.keeping_file_fp8(file_fp8) if file_fp8 else weights


@dataclass(frozen=True)
class RequestPlan:
    """One request's decisions, made once and read by every stage of its generation."""

    request: Request
    run: RunPlan
    negative_prompt: str
    schedule: Schedule
    magcache: Plan | None  # the skip schedule (None: a dense run)
    decode_tile: int | None  # the VAE tile edge in pixels the memory plan needs (None: untiled)
    memory_record: dict[str, Any] | None  # the sidecar's `memory_plan` (None: a CPU run)


def plan_request(request: Request, run: RunPlan, magcache: Plan | None) -> RequestPlan:
    """`magcache`: the plan checked before loading (`plan_check.check_magcache_plan`), passed on."""
    negative = request.negative_prompt if request.negative_prompt is not None else run.task.negative_prompt
    tile = run.memory.decode_tile(request) if run.memory is not None else None
    return RequestPlan(
        request=request,
        run=run,
        negative_prompt=negative,
        schedule=make_schedule(request.sample_solver, request.sample_steps, request.sample_shift),
        magcache=magcache,
        decode_tile=tile,
        memory_record=run.memory.record(tile) if run.memory is not None else None,
    )


def magcache_plans(requests: list[Request]) -> list[Plan | None]:
    """The MagCache plan of each request, for callers that did not check them before loading (the
    command checks them before anything loads and passes them on)."""
    return [check_magcache_plan(r) for r in requests]
