"""Loads that overlap other work: the first expert with the text encoder, the second while the first
denoises, a batch's experts kept in host memory, as the host plan decides."""

import json
import threading

import pytest
import torch

import wan.experts
from tests.cli_runs import run_cli
from wan.background_load import BackgroundLoad
from wan.errors import CheckpointError
from wan.experts import ExpertPool
from wan.host_plan import GIB, HOST_HEADROOM, HostFacts, plan_host
from wan.testing.checkpoint import write_tiny_checkpoint
from wan.testing.dit import tiny_transformer_config, write_transformer_folder


def facts(**kw) -> HostFacts:
    base = dict(
        experts=2,
        device_type="cpu",
        offload=True,
        t5_on_device=False,
        device_room_for_both=False,
        batch=False,
        expert_bytes=10 * GIB,
        expert_host_bytes=10 * GIB,
        t5_host_bytes=GIB,
        available=64 * GIB,
    )
    return HostFacts(**{**base, **kw})


def test_host_plan_loads_the_second_expert_in_the_background_only_with_room():
    need = 2 * 10 * GIB + GIB + HOST_HEADROOM
    roomy = plan_host(facts(available=need, batch=True))
    assert roomy.second_background and roomy.keep_experts and roomy.text_overlap
    assert "second expert: background load" in roomy.render()
    assert "batch: both experts kept" in roomy.render()
    tight = plan_host(facts(available=need - 1, batch=True))
    assert not tight.second_background and not tight.keep_experts
    assert "second expert: loaded when needed (25.0 GiB host needed for both" in tight.render()
    assert "experts reloaded per item" in tight.render()
    assert not plan_host(facts(available=None)).second_background  # unknown: nothing doubles the host share
    assert "batch" not in plan_host(facts()).render()  # one video: no batch line
    assert tight.to_json()["second_expert"] == "loaded when needed"


def test_host_plan_without_offload_and_on_the_gpu():
    # without offloading both experts stay once loaded: loading the second early costs nothing more
    assert plan_host(facts(offload=False, available=GIB)).second_background
    gpu = dict(device_type="cuda", expert_host_bytes=GIB, t5_host_bytes=0)
    offloaded = plan_host(facts(**gpu, t5_on_device=True, batch=True))
    assert not offloaded.second_background and offloaded.keep_experts
    assert not offloaded.text_overlap  # the text encoder and the expert would share the GPU
    assert plan_host(facts(**gpu, t5_on_device=True, device_room_for_both=True)).text_overlap
    assert "--offload-model: one expert on the GPU at a time" in offloaded.render()
    assert plan_host(facts(**gpu, t5_on_device=False)).text_overlap  # --t5-cpu
    one = plan_host(facts(experts=1))
    assert one.text_overlap and "second expert" not in one.render()


def make_pool(tmp_path, **kw):
    cfg = tiny_transformer_config("t2v")
    paths = {
        name: write_transformer_folder(tmp_path / name, cfg, seed=i) for i, name in enumerate(("high", "low"))
    }
    return ExpertPool(paths, dtype=torch.float32, device=torch.device("cpu"), **kw)


def test_the_first_expert_loads_while_the_caller_works(tmp_path):
    """An ordering check with a loader held open until the caller's work (the encode) is done."""
    order, started, release = [], threading.Event(), threading.Event()

    def slow_start(expert, path):
        order.append(("load started", expert, threading.current_thread() is threading.main_thread()))
        started.set()
        assert release.wait(60)  # a deadlock guard, not a timing

    pool = make_pool(tmp_path, offload=True, keep_inactive=False, on_load=slow_start)
    pool.prefetch("high")
    assert started.wait(60)
    order.append("encode")  # the caller's work, while the load is open
    release.set()
    high = pool.activate("high")
    assert order == [("load started", "high", False), "encode"]
    assert [name for name, _, _ in pool.loads] == ["high"] and pool.models == {"high": high}


def test_background_next_loads_the_second_expert_once(tmp_path):
    loads = []
    pool = make_pool(
        tmp_path,
        offload=True,
        keep_inactive=False,
        background_next=True,
        on_load=lambda e, p: loads.append(e),
    )
    pool.activate("high")  # starts "low" in the background
    low = pool.activate("low")
    assert loads == ["high", "low"] and set(pool.models) == {"low"}
    assert pool.activate("low") is low and loads == ["high", "low"]  # the freed "high" is not prefetched


def test_a_background_error_is_raised_once_in_the_caller():
    def fail():
        raise CheckpointError("'x.safetensors' is truncated; re-download it")

    load = BackgroundLoad("high", fail)
    with pytest.raises(CheckpointError, match="truncated"):
        load.result()
    assert load.result() is None  # raised once


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-A14B", "t2v-A14B", seed=3)


# three steps: the third runs on the low-noise expert
ARGS = ["--size", "832*480", "--frame-num", "1", "--sample-steps", "3", "--base-seed", "7", "--device", "cpu"]


def counted_loads(monkeypatch, fail: str | None = None) -> list[str]:
    """Counts the transformer loads (by expert folder); `fail`: the folder whose load raises."""
    loads, real = [], wan.experts.load_transformer

    def load(path, **kw):
        loads.append(path.name)
        if path.name == fail:
            raise CheckpointError(f"'{path}' is unreadable; re-download it")
        return real(path, **kw)

    monkeypatch.setattr(wan.experts, "load_transformer", load)
    return loads


def test_a_failing_background_load_is_one_error_line(a14b, tmp_path, monkeypatch, capsys):
    loads = counted_loads(monkeypatch, fail="low_noise_model")
    out = tmp_path / "v.mp4"
    code = run_cli(["--ckpt-dir", str(a14b), "--prompt", "a red ball", "--save-file", str(out), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: '{a14b / 'low_noise_model'}' is unreadable; re-download it"
    ]
    assert "Traceback" not in err and loads == ["high_noise_model", "low_noise_model"]


def test_a_batch_loads_each_expert_once_and_says_so(a14b, tmp_path, monkeypatch, capsys):
    loads = counted_loads(monkeypatch)
    items = [{"prompt": f"a ball {i}", "save_file": str(tmp_path / f"{i}.mp4")} for i in range(3)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    code = run_cli(["--ckpt-dir", str(a14b), "--prompt-file", str(prompts), *ARGS])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(loads) == ["high_noise_model", "low_noise_model"]  # not once per item
    assert "second expert: background load" in out and "batch: both experts kept" in out
    first = json.loads((tmp_path / "0.json").read_text())
    loaded = first["time_to_first_step"]["expert_load_s"]
    assert loaded["total"] > 0 and loaded["waited"] <= loaded["total"]
    assert first["host_plan"]["keep_experts"] is True


def test_time_to_first_step_splits_the_overlapped_load():
    from magcache_generate.startup import MILESTONES, StartupClock

    clock = StartupClock(origin=100.0, origin_source="test", now=101.0)
    at = dict(zip([name for name, _ in MILESTONES], [101, 102, 103, 104, 108, 109, 112], strict=True))
    for name, when in at.items():
        clock.mark(name, float(when))
    clock.load_s = 0.5  # the denoising waited half a second for the first expert
    # the first expert loads from 105 (during the text stage, 104-108) to 109.5; the second one starts
    # in the background with the first step and is not part of the first step's load
    report = clock.report([("high", 105.0, 109.5), ("low", 109.5, 111.0)])
    assert report["expert_load_s"] == {"total": 4.5, "with_text": 3.0, "before_denoise": 4.0, "waited": 0.5}
    assert report["parts_s"]["load"] == 0.5 and sum(report["parts_s"].values()) == pytest.approx(12.0)
