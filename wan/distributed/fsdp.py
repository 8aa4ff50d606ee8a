"""Sharding the DiT's weights over a rank group with PyTorch's FSDP2 (`fully_shard`), upstream's
`--dit_fsdp`: each block's parameters are split across the group's ranks and gathered for the block's
forward only, then freed, so a rank holds 1/N of the blocks plus the block being run.

The loader shards the model while it is still on the meta device (`wan.loading.load_transformer`'s
`shard`), so each rank allocates and fills only its own rows of each tensor (`local_rows`): neither the
GPU nor the host ever holds a whole expert.

The group must run the same forwards in the same order (every FSDP all-gather is a collective): a
Ulysses group does (its ranks share every forward and MagCache makes the same decision on each),
the two halves of a CFG-parallel group do not (they skip different calls).
"""

from __future__ import annotations

from typing import Any

import torch
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


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an FSDP-sharded parameter (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_rows(full: torch.Tensor, param: Any) -> torch.Tensor:
    """The rows of `full` (the whole tensor, e.g. a view of the checkpoint) that this rank holds of the
    sharded parameter `param`: FSDP2 splits dim 0 into chunks of ceil(rows / N), the last ones shorter
    or empty."""
    local = param.to_local()
    rows, world = full.shape[0], param.device_mesh.size()
    chunk = -(-rows // world)
    start = min(rows, param.device_mesh.get_local_rank() * chunk)
    part = full[start : start + chunk]
    if part.shape != local.shape:
        raise ValueError(
            f"rows {start}..{start + part.shape[0]} of {tuple(full.shape)} do not fit the shard {tuple(local.shape)}"
        )
    return part
