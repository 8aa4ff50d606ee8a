"""Parallel paths on gloo CPU processes give the single-process result. The 2-rank Ulysses case always
runs; the others are marked `distributed` (each spawns 3-4 processes: run them with -m distributed)."""

from __future__ import annotations

import pytest
import torch
from distributed_workers import HEADS, released_expert_rank, run_sampling, sampling_rank, sharded_load_rank

from wan.testing.distributed import spawn_ranks
from wan.testing.dit import tiny_transformer_config, write_transformer_folder
from wan.weight_storage import WeightStorage

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


@many
@pytest.mark.parametrize(
    "storage",
    [
        WeightStorage(
            torch.float32, autocast=torch.bfloat16
        ),  # bf16 Linears, float32 rest, widened time MLPs
        WeightStorage(torch.float32, quantize="fp8"),  # fp8 Linears with scalar scales (kept whole)
        WeightStorage(torch.float32, quantize="fp8", granularity="row"),
    ],
    ids=["autocast", "fp8", "fp8-rows"],
)
def test_a_sharded_load_holds_each_ranks_rows_of_the_plain_load(tmp_path, storage):
    """--dit-fsdp loads each rank's rows only: gathered, they are the plain load's tensors exactly."""
    cfg = tiny_transformer_config("t2v", num_heads=6, dim=72, num_layers=3)
    folder = write_transformer_folder(tmp_path / "dit", cfg, seed=5, shards=2)
    results = spawn_ranks(sharded_load_rank, 2, str(folder), storage)
    for rank, (differ, held, total) in enumerate(results):
        assert differ == [], rank
        assert held < 0.52 * total, rank  # half, plus rows that do not split (modulation tables, scales)
    assert sum(held for _, held, _ in results) >= results[0][2]  # every element is held somewhere


@many
def test_a_released_sharded_expert_is_freed(tmp_path):
    """--dit-fsdp frees one video's experts before its decode (`Models.after_denoise`): nothing keeps them."""
    cfg = tiny_transformer_config("t2v", num_heads=HEADS, dim=12 * HEADS)
    folder = write_transformer_folder(tmp_path / "dit", cfg, seed=5, shards=1)
    assert spawn_ranks(released_expert_rank, 2, str(folder)) == [(True, True), (True, True)]
