import torch

from wan.experts import ExpertPool
from wan.testing.dit import tiny_transformer_config, write_transformer_folder


def make_pool(tmp_path, **kw):
    cfg = tiny_transformer_config("t2v")
    paths = {
        name: write_transformer_folder(tmp_path / name, cfg, seed=i) for i, name in enumerate(("high", "low"))
    }
    loads = []
    pool = ExpertPool(
        paths, dtype=torch.float32, device=torch.device("cpu"), on_load=lambda e, p: loads.append(e), **kw
    )
    return pool, loads


def test_experts_load_lazily_and_the_finished_one_is_freed(tmp_path):
    pool, loads = make_pool(tmp_path, offload=True, keep_inactive=False)
    assert pool.models == {}
    high = pool.activate("high")
    assert loads == ["high"] and pool.activate("high") is high  # no reload while active
    pool.activate("low")
    assert loads == ["high", "low"] and set(pool.models) == {"low"}  # never two experts held


def test_batch_runs_keep_the_inactive_expert(tmp_path):
    pool, loads = make_pool(tmp_path, offload=True, keep_inactive=True)
    high = pool.activate("high")
    pool.activate("low")
    assert pool.activate("high") is high and loads == ["high", "low"]


def test_without_offload_both_stay(tmp_path):
    pool, _ = make_pool(tmp_path, offload=False, keep_inactive=False)
    pool.activate("high")
    pool.activate("low")
    assert set(pool.models) == {"high", "low"}
