"""The host plan of a run (`wan.host_plan`) fed with this run's facts: the experts' bytes in their
storage dtypes (from the checkpoint headers, no tensor data), where the text encoder runs, the GPU
plan's streamed share, and the host's `MemAvailable` as read now, before any weight loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from wan.experts import available_host_memory
from wan.host_plan import HostFacts, HostPlan, plan_host
from wan.loading import locate_transformer_files, read_tensor_table

if TYPE_CHECKING:
    import torch

    from magcache_generate.budget import RunMemory
    from wan.weight_storage import WeightStorage


def expert_bytes(path: Path, storage: WeightStorage) -> int:
    """One expert's parameter bytes as stored for this run (fp8 scales aside: a few bytes per Linear)."""
    table = read_tensor_table(locate_transformer_files(path))
    return sum(info.numel * storage.dtype_of(key).itemsize for key, (info, _) in table.items())


def plan_host_run(
    *,
    experts: dict[str, Path],
    storage: WeightStorage,
    device: torch.device,
    offload: bool,
    t5_device: torch.device,
    t5_file: Path,
    memory: RunMemory | None,
    batch: bool,
    available: Callable[[], int | None] = available_host_memory,
) -> HostPlan:
    whole = expert_bytes(next(iter(experts.values())), storage)
    if device.type == "cpu":
        host_part = whole
    else:  # a GPU run keeps the streamed blocks in host memory
        host_part = memory.plan.streamed_blocks * memory.plan.block_bytes if memory is not None else 0
    t5_on_device = t5_device.type != "cpu"
    room = memory is not None and memory.plan.estimates["text"] + whole - host_part <= memory.plan.budget
    t5_host = 0 if t5_on_device or not t5_file.is_file() else t5_file.stat().st_size
    facts = HostFacts(
        experts=len(experts),
        device_type=device.type,
        offload=offload,
        t5_on_device=t5_on_device,
        device_room_for_both=room,
        batch=batch,
        expert_bytes=whole,
        expert_host_bytes=host_part,
        t5_host_bytes=t5_host,
        available=available(),
    )
    return plan_host(facts)
