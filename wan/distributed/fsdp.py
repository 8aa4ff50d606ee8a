"""Sharding the DiT's weights over a rank group with PyTorch's FSDP2 (`fully_shard`), upstream's
`--dit_fsdp`: each block's parameters are split across the group's ranks and gathered for the block's
forward only, then freed, so a rank holds 1/N of the blocks plus the block being run.

The group must run the same forwards in the same order (every FSDP all-gather is a collective): a
Ulysses group does (its ranks share every forward and MagCache makes the same decision on each),
the two halves of a CFG-parallel group do not (they skip different calls).
"""

from __future__ import annotations

from typing import Any

from torch import nn


def shard_weights(model: nn.Module, group: Any, device_type: str) -> None:
    """Shard every block of `model`, then the rest (embeddings, head) as one unit, over `group`.

    Scalar parameters (the per-tensor scales of fp8 Linears) cannot be split: FSDP2 refuses them, so
    every rank keeps them whole (a few bytes each)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group, device_type)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for block in model.blocks:
        fully_shard(block, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
