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
    ("world", "model_type", "ulysses", "cfg_parallel"),
    [
        (2, "t2v", True, False),  # 45 tokens over 2 ranks: padded shards
        (3, "ti2v", True, False),  # per-token timesteps follow the shards
        (2, "t2v", False, True),
        (4, "t2v", True, True),  # Ulysses 2 x CFG 2
    ],
)
def test_parallel_sampling_equals_single_process(world, model_type, ulysses, cfg_parallel):
    want, _ = run_sampling(model_type)
    for rank, got in enumerate(spawn_ranks(sampling_rank, world, model_type, ulysses, cfg_parallel)):
        assert got.shape == want.shape, rank
        assert_close(got, want)
