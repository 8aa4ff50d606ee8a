"""`--gpu-memory GB|auto`: the GPU memory budget of a run, and the memory plan built from it before any
weight loads (`wan.memory_plan` does the arithmetic; this module feeds it a run's facts).

`parse_gpu_memory` is torch-free (the CLI checks the flag before importing torch); `plan_run` needs
the device and the DiT config read off the checkpoint headers.

GB here means GiB (2^30 bytes), as nvidia-smi and torch count. `auto` is the device's free memory
minus a margin. A CPU run takes no budget; setting MAGCACHE_SIMULATE_GPU_GIB (GiB) makes a CPU run
plan as if it had a GPU of that budget and stream blocks through the fake device split (for testing
the streaming path end to end without a GPU).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from magcache_generate.request import Request, UserError
from wan.configs import SIZES, TASKS

if TYPE_CHECKING:
    import torch

    from wan.memory_plan import MemoryPlan, MemoryRequest
    from wan.placement import Placement

GIB = 2**30
SIMULATE_ENV = "MAGCACHE_SIMULATE_GPU_GIB"
AUTO_MARGIN_FIXED = GIB // 2  # auto budget = free - (0.5 GiB + 2% of the card)
AUTO_MARGIN_FRACTION = 0.02
_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:gib|gb|g)?\s*", re.IGNORECASE)


def parse_gpu_memory(value: str | float | None) -> float | None:
    """`--gpu-memory`: None or "auto" -> None (automatic); "8", "8GB", "7.5GiB" -> GiB as a float."""
    if value is None:
        return None
    if isinstance(value, int | float):
        text = repr(value)
    else:
        text = value
        if text.strip().lower() == "auto":
            return None
    match = _NUMBER.fullmatch(text)
    number = float(match.group(1)) if match else math.nan
    if not math.isfinite(number) or number <= 0:
        raise UserError(
            f"--gpu-memory {value!r} is not a budget; give GiB as a number > 0 (e.g. 8 or 7.5), or auto"
        )
    return number


def check_gpu_memory(value: str | float | None, device: str) -> float | None:
    """The parsed budget; a budget on a --device cpu run is refused (a CPU run has no GPU to plan)."""
    budget = parse_gpu_memory(value)
    if budget is not None and device == "cpu":
        raise UserError(f"--gpu-memory {value} applies to GPU runs, and --device is cpu; drop --gpu-memory")
    return budget


# ----------------------------------------------------------------------------------------------------
# The plan of a run
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMemory:
    """The memory plan of a run (all its requests) and where its budget came from."""

    plan: MemoryPlan
    source: str  # "--gpu-memory 8" | "--gpu-memory auto (...)" | the CPU simulation
    device: torch.device
    dit_config: Any
    batch: bool
    shards: tuple[int, int] = (1, 1)  # one torchrun rank's part (`memory_request`)

    def placement(self) -> Placement:
        from wan.placement import Placement

        plan = self.plan
        return Placement(
            self.device,
            resident_blocks=plan.resident_blocks if plan.streamed_blocks else None,
            pin=self.device.type == "cuda",
            activation_chunk=plan.activation_chunk,
        )

    def decode_tile(self, request: Request) -> int | None:
        """This request's VAE tile edge in pixels (None: untiled), planned for its own size."""
        from wan.memory_plan import plan_memory

        req = memory_request(
            request,
            self.dit_config,
            self.plan.budget,
            batch=self.batch,
            device=self.device,
            shards=self.shards,
        )
        req = dataclasses.replace(req, cfg_batch=self.plan.cfg_batch)  # as planned for the run
        return plan_memory(req, budget_source=self.source).vae_tile_px

    def record(self, tile: int | None) -> dict[str, Any]:
        """The sidecar's `memory_plan` of a request whose decode tile is `tile` (`decode_tile`)."""
        return {
            **self.plan.to_json(),
            "vae_tiled": tile is not None,
            "vae_tile_px": tile,
            "budget_source": self.source,
            "device": str(self.device),
        }

    def to_json(self, request: Request) -> dict[str, Any]:
        return self.record(self.decode_tile(request))

    def render(self) -> str:
        return self.plan.render(self.source)


def resolve_budget(request: Request, device: torch.device) -> tuple[int, str] | None:
    """(budget bytes, where it came from), or None when no plan applies (a CPU run)."""
    import torch

    given = request.gpu_memory
    if device.type != "cuda":
        if given is not None:
            raise UserError(
                f"--gpu-memory {given:g} applies to GPU runs, and this run is on the CPU "
                "(no CUDA device); drop --gpu-memory"
            )
        simulated = os.environ.get(SIMULATE_ENV)
        if not simulated:
            return None
        gib = parse_gpu_memory(simulated)
        return int(gib * GIB), f"{SIMULATE_ENV}={simulated} (CPU, fake device split)"
    free, total = torch.cuda.mem_get_info(device)
    if given is not None:
        if given * GIB > total:
            raise UserError(
                f"--gpu-memory {given:g} is more than {device} has ({total / GIB:.1f} GiB); "
                "give at most that, or auto"
            )
        return int(given * GIB), f"--gpu-memory {given:g}"
    margin = AUTO_MARGIN_FIXED + int(AUTO_MARGIN_FRACTION * total)
    return max(0, free - margin), f"--gpu-memory auto ({free / GIB:.1f} GiB free on {device} minus a margin)"


def memory_request(
    request: Request,
    dit_config: Any,
    budget: int,
    *,
    batch: bool,
    device: torch.device | str = "cuda",
    shards: tuple[int, int] = (1, 1),
) -> MemoryRequest:
    """What the planner needs to know about one request (reads two file sizes, no tensor data).
    `device`: where the run goes; it decides the weight storage (`wan.weight_storage`: float32 runs on
    CUDA store their autocast Linears in bf16, a CPU run, the simulation included, stores float32).
    `shards`: under torchrun, (Ulysses ranks sharing the tokens, --dit-fsdp ranks sharing the weights)."""
    import torch

    from wan.memory_plan import MemoryRequest
    from wan.weight_storage import WeightStorage

    task = TASKS[request.task]
    width, height = SIZES[request.size]  # with an image it is an area budget: the same token count
    paths = request.weight_paths
    t5, vae = paths.t5, paths.vae
    dtype = torch.bfloat16 if request.convert_model_dtype else torch.float32
    linear_dtype = WeightStorage.for_run(dtype, torch.device(device)).dtype_of("blocks.0.ffn.0.weight")
    return MemoryRequest(
        task=task,
        dit=dit_config,
        width=width,
        height=height,
        frames=request.frame_num,
        budget=budget,
        weight_bytes=2 if request.convert_model_dtype else 4,
        offload=request.offload_model,
        t5_cpu=request.t5_cpu,
        vae_tiled=request.vae_tiled,
        residual_cache=request.magcache.enabled or request.magcache.calibrate_file is not None,
        image=request.image is not None,
        vae_during_denoise=batch or request.image is not None,
        t5_bytes=t5.stat().st_size if t5.is_file() else 0,
        vae_bytes=vae.stat().st_size if vae.is_file() else 0,
        autocast_linear_bytes=linear_dtype.itemsize,
        # fp8 DiT files hold their block Linears in fp8 (per-row scales: one float32 per row)
        fp8_linears=request.quantize == "fp8" or paths.dit_fp8 is not None,
        fp8_row_scales=paths.dit_fp8 == "row",
        sequence_shards=shards[0],
        weight_shards=shards[1],
        # --dit-fsdp keeps the experts on the GPUs; one video frees them before its decode (`Models`)
        dit_freed_before_decode=shards[1] > 1 and not batch,
    )


def plan_run(
    requests: list[Request],
    dit_config: Any,
    device: torch.device,
    *,
    batch: bool,
    shards: tuple[int, int] = (1, 1),
) -> RunMemory | None:
    """Plan every request within the budget, before any weight loads; the DiT placement of the run is
    the leanest of them (fewest resident blocks, smallest chunk). None for a CPU run. Under torchrun
    the plan is one rank's (`shards`: see `memory_request`)."""
    from magcache_generate.cfg_batching import planner_policy

    budget = resolve_budget(requests[0], device)
    if budget is None:
        return None
    budget_bytes, source = budget
    memory_requests = [
        memory_request(request, dit_config, budget_bytes, batch=batch, device=device, shards=shards)
        for request in requests
    ]
    cfg_batch = planner_policy(requests, device.type)  # --cfg-batch: room for a batch-2 CFG forward?
    try:
        combined = combine_plans(memory_requests, cfg_batch, source)
    except ItemInfeasibleError as err:
        request = requests[err.index]
        where = (
            f"prompt-file item {err.index + 1} ({request.size}, {request.frame_num} frames): "
            if batch
            else ""
        )
        raise UserError(f"{where}{err}") from None
    return RunMemory(combined, source, device, dit_config, batch, shards)


class ItemInfeasibleError(ValueError):
    """The item at `index` has no plan within the budget; the message says why."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def combine_plans(memory_requests: list[MemoryRequest], cfg_batch: str, source: str) -> MemoryPlan:
    """One plan for a run from its items' memory requests (each built once, for the run's device): the
    DiT placement is the leanest of them (fewest resident blocks, smallest chunk), CFG batching only
    when every item has room for it."""
    from wan.memory_plan import PlanInfeasibleError, plan_cfg_batch

    plans = []
    for index, req in enumerate(memory_requests):
        try:
            plans.append(plan_cfg_batch(req, cfg_batch, budget_source=source))
        except PlanInfeasibleError as err:
            raise ItemInfeasibleError(index, str(err)) from None
    if len({p.cfg_batch for p in plans}) > 1:  # auto batches a run only when every item has room
        plans = [plan_cfg_batch(req, "off", budget_source=source) for req in memory_requests]
    leanest = min(plans, key=lambda p: (p.resident_blocks, p.activation_chunk or math.inf))
    chunks = [p.activation_chunk for p in plans if p.activation_chunk is not None]
    return dataclasses.replace(
        leanest,
        activation_chunk=min(chunks) if chunks else None,
        t5_on_cpu=any(p.t5_on_cpu for p in plans),
    )
