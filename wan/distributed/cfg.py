"""CFG parallelism: the two halves of a rank group run the cond and the uncond forward of a step at
once, then trade their predictions with one all-gather (LightX2V's dist-CFG). Steps with one branch
(guide scale 1) run the cond forward on both halves, which keeps them in step at no extra time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from wan.guidance import COND, UNCOND


@dataclass
class CfgParallel:
    group: Any  # the two ranks: index 0 runs cond, index 1 uncond
    index: int

    @classmethod
    def for_group(cls, group: Any) -> CfgParallel:
        if dist.get_world_size(group) != 2:
            raise ValueError(f"a CFG-parallel group has 2 ranks, not {dist.get_world_size(group)}")
        return cls(group, dist.get_rank(group))

    @property
    def branch(self) -> str:
        """The forward this rank runs on steps with both branches."""
        return (COND, UNCOND)[self.index]

    def exchange(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's prediction -> (cond, uncond) on both ranks."""
        parts = [torch.empty_like(v), torch.empty_like(v)]
        dist.all_gather(parts, v.contiguous(), group=self.group)
        return parts[0], parts[1]
