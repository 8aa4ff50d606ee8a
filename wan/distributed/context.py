"""The process group and the rank groups of one run: created once, passed down (no module state
beyond torch.distributed's own).

NCCL on CUDA (each rank on `cuda:LOCAL_RANK`), gloo on the CPU. The process group has a timeout, so a
rank waiting on a collective that a failed rank never joins raises instead of hanging; torchrun then
ends the other ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from wan.distributed.layout import ENV_LOCAL_RANK, ParallelLayout, RankRole

DEFAULT_TIMEOUT = timedelta(minutes=10)


@dataclass
class ParallelContext:
    """World, this rank's role and its groups. `single()` is the one-process context (no groups)."""

    layout: ParallelLayout
    role: RankRole
    device: torch.device
    ulysses_group: Any = None  # torch.distributed ProcessGroup of this rank's Ulysses group
    cfg_group: Any = None  # the two ranks (same shard) running cond and uncond
    replica_group: Any = None  # all ranks of this rank's replica
    _owns_group: bool = field(default=False, repr=False)

    @classmethod
    def single(cls, device: torch.device | None = None) -> ParallelContext:
        layout = ParallelLayout()
        return cls(layout, layout.role(0), device or torch.device("cpu"))

    @classmethod
    def initialize(
        cls, layout: ParallelLayout, device_type: str, *, timeout: timedelta = DEFAULT_TIMEOUT
    ) -> ParallelContext:
        """Join the torchrun world (env:// rendezvous) and create every rank group.

        Every rank creates every group in the same order (`new_group` is collective)."""
        if device_type == "cuda":
            local = int(os.environ.get(ENV_LOCAL_RANK, "0"))
            torch.cuda.set_device(local)
            device, backend = torch.device("cuda", local), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        owns = not dist.is_initialized()
        if owns:
            kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
            if backend == "nccl":
                kwargs["device_id"] = device
            dist.init_process_group(**kwargs)
        if dist.get_world_size() != layout.world:
            raise RuntimeError(
                f"layout is for {layout.world} ranks, the process group has {dist.get_world_size()}"
            )
        role = layout.role(dist.get_rank())
        ctx = cls(layout, role, device, _owns_group=owns)
        for replica in range(layout.replicas):
            for c in range(layout.cfg_size):
                group = dist.new_group(layout.ulysses_ranks(replica, c))
                if (replica, c) == (role.replica, role.cfg_index):
                    ctx.ulysses_group = group
            for u in range(layout.ulysses):
                group = dist.new_group(layout.cfg_ranks(replica, u))
                if (replica, u) == (role.replica, role.ulysses_index):
                    ctx.cfg_group = group
            group = dist.new_group(layout.replica_ranks(replica))
            if replica == role.replica:
                ctx.replica_group = group
        return ctx

    # -- who does what --------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.role.rank

    @property
    def distributed(self) -> bool:
        return self.layout.distributed

    @property
    def is_main(self) -> bool:
        """Rank 0: prints the run's log and the closing table."""
        return self.role.rank == 0

    @property
    def is_writer(self) -> bool:
        """The first rank of a replica: decodes and writes its videos, sidecars and frames."""
        return self.role.rank == self.layout.writer(self.role.replica)

    def items(self, count: int) -> list[int]:
        """Indices of the prompt-file items this rank's replica generates (round robin)."""
        return list(range(self.role.replica, count, self.layout.replicas))

    # -- collectives used by the orchestration --------------------------------------------------

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """`value` of rank `src` on every rank (e.g. the requests with a random seed drawn once)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_objects(self, value: Any, group: Any = None) -> list[Any]:
        """`value` of every rank of `group` (default: the world), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, value, group=group)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
