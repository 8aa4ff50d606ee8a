"""The parallel layout and its checks (torch-free, one process)."""

from __future__ import annotations

import pytest

from magcache_generate.parallel import ParallelOptions, check_parallel, silent_error
from magcache_generate.request import UserError
from wan.distributed.layout import ParallelLayout, ulysses_sizes


def test_ranks_are_replica_major_with_ulysses_groups_consecutive():
    layout = ParallelLayout(world=8, ulysses=2, cfg_parallel=True)
    assert (layout.group_size, layout.replicas) == (4, 2)
    assert layout.ulysses_ranks(1, 1) == [6, 7]
    assert layout.cfg_ranks(1, 0) == [4, 6]
    assert layout.replica_ranks(1) == [4, 5, 6, 7]
    assert layout.writer(1) == 4
    role = layout.role(7)
    assert (role.replica, role.cfg_index, role.ulysses_index) == (1, 1, 1)


def test_ulysses_sizes_divide_heads_and_world():
    assert ulysses_sizes(40, 8) == [1, 2, 4, 8]
    assert ulysses_sizes(24, 8) == [1, 2, 4, 8]
    assert ulysses_sizes(40, 6) == [1, 2]


def world(n: int) -> dict[str, str]:
    return {"WORLD_SIZE": str(n), "RANK": "0", "LOCAL_RANK": "0"}


@pytest.mark.parametrize(
    ("options", "ranks", "kwargs", "message"),
    [
        (
            ParallelOptions(ulysses_size=2),
            1,
            {},
            "--ulysses-size needs several processes; launch with torchrun",
        ),
        (ParallelOptions(cfg_parallel=True), 1, {}, "--cfg-parallel needs several processes"),
        (ParallelOptions(dit_fsdp=True), 1, {}, "--dit-fsdp needs several processes"),
        (ParallelOptions(ulysses_size=3), 2, {}, "--ulysses-size 3 does not divide the world size 2"),
        (ParallelOptions(ulysses_size=0), 2, {}, "give a positive number of ranks"),
        (
            ParallelOptions(ulysses_size=8),
            8,
            {"num_heads": 12},
            "does not divide the model's 12 attention heads; sizes that work with world size 8: [1, 2, 4]",
        ),
        (ParallelOptions(cfg_parallel=True), 3, {}, "--cfg-parallel needs a world size divisible by 2"),
        (ParallelOptions(cfg_parallel=True), 2, {"uses_cfg": False}, "guide scale 1 for both experts"),
        (ParallelOptions(), 2, {}, "pass --prompt-file, or raise --ulysses-size"),
        (
            ParallelOptions(dit_fsdp=True),
            2,
            {"prompt_file": True},
            "--dit-fsdp shards the DiT over a Ulysses",
        ),
        (
            ParallelOptions(cfg_parallel=True),
            2,
            {"calibrate": True},
            "drop --cfg-parallel for the calibration",
        ),
    ],
)
def test_bad_layouts_are_refused_before_loading(options, ranks, kwargs, message):
    args = {"uses_cfg": True, "prompt_file": False, **kwargs}
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_parallel(options, environ=world(ranks), **args)


@pytest.mark.parametrize(
    ("options", "ranks", "prompt_file"),
    [
        (ParallelOptions(), 1, False),  # one process: as before
        (ParallelOptions(ulysses_size=8, dit_fsdp=True, t5_fsdp=True), 8, False),  # upstream's command
        (ParallelOptions(ulysses_size=2, cfg_parallel=True), 4, False),
        (ParallelOptions(), 4, True),  # four replicas over a prompt file
    ],
)
def test_good_layouts(options, ranks, prompt_file):
    layout = check_parallel(
        options, uses_cfg=True, prompt_file=prompt_file, num_heads=40, environ=world(ranks)
    )
    assert layout.world == ranks


def test_only_rank_0_reports_a_bad_input(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert silent_error(UserError("x"), (UserError,))
    assert not silent_error(RuntimeError("x"), (UserError,))
    monkeypatch.setenv("RANK", "0")
    assert not silent_error(UserError("x"), (UserError,))
