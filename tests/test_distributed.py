"""Parallel paths on gloo CPU processes give the single-process result (marked `distributed`: each test
spawns 2-4 processes; deselect with -m "not distributed")."""

from __future__ import annotations

import pytest
import torch
from distributed_workers import run_sampling, sampling_rank

from wan.testing.distributed import spawn_ranks

pytestmark = pytest.mark.distributed


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("world", "model_type", "ulysses", "cfg_parallel", "fsdp"),
    [
        (2, "t2v", True, False, False),  # 45 tokens over 2 ranks: padded shards
        (3, "ti2v", True, False, True),  # per-token timesteps follow the shards; weights sharded too
        (2, "t2v", False, True, False),
        (4, "t2v", True, True, False),  # Ulysses 2 x CFG 2
    ],
)
def test_parallel_sampling_equals_single_process(world, model_type, ulysses, cfg_parallel, fsdp):
    want, _ = run_sampling(model_type)
    args = (model_type, ulysses, cfg_parallel, fsdp)
    for rank, got in enumerate(spawn_ranks(sampling_rank, world, *args)):
        assert got.shape == want.shape, rank
        assert_close(got, want)
