"""Parallel paths on gloo CPU processes give the single-process result. The 2-rank Ulysses case always
runs; the others are marked `distributed` (each spawns 3-4 processes: run them with -m distributed)."""

from __future__ import annotations

import pytest
import torch
from distributed_workers import run_sampling, sampling_rank

from wan.testing.distributed import spawn_ranks

many = pytest.mark.distributed


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("world", "model_type", "ulysses", "cfg_parallel", "fsdp"),
    [
        (2, "t2v", True, False, False),  # 45 tokens over 2 ranks: padded shards
        # per-token timesteps follow the shards; weights sharded too
        pytest.param(3, "ti2v", True, False, True, marks=many),
        pytest.param(2, "t2v", False, True, False, marks=many),
        pytest.param(4, "t2v", True, True, False, marks=many),  # Ulysses 2 x CFG 2
    ],
)
def test_parallel_sampling_equals_single_process(world, model_type, ulysses, cfg_parallel, fsdp):
    want, _ = run_sampling(model_type)
    args = (model_type, ulysses, cfg_parallel, fsdp)
    for rank, got in enumerate(spawn_ranks(sampling_rank, world, *args)):
        assert got.shape == want.shape, rank
        assert_close(got, want)
