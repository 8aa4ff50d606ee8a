"""Each per-request decision is made once and handed on (the distilled recipe, the MagCache plan, the
attention check, the memory requests and the decode tile), and a batch stops after a GPU error that
outlives its item."""

import json
from dataclasses import dataclass

import pytest
import torch
from cli_runs import run_cli

import magcache_generate.budget as budget
import magcache_generate.dit_runtime as dit_runtime
import magcache_generate.magcache.settings as magcache_settings
import magcache_generate.run as run
import magcache_generate.validate as validate
from magcache_generate.batch import EXIT_PARTIAL
from magcache_generate.budget import SIMULATE_ENV

BASE = ["--size", "832*480", "--frame-num", "1", "--sample-steps", "3", "--device", "cpu"]


def spy(monkeypatch, owner, name: str) -> list:
    """Replace `owner.name` by a wrapper that records each call's arguments, then calls through."""
    calls = []
    original = getattr(owner, name)

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


def prompt_file(tmp_path, count: int):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt number {i}\n" for i in range(count)))
    return path


def test_each_decision_is_made_once_per_request(tiny_checkpoint_source, tmp_path, monkeypatch):
    monkeypatch.setenv(SIMULATE_ENV, "64")  # a memory plan on the CPU (the fake device split)
    recipe = spy(monkeypatch, validate, "apply_distilled")
    magcache = spy(monkeypatch, magcache_settings, "make_plan")
    attention = [
        spy(monkeypatch, validate, "check_attention"),
        spy(monkeypatch, dit_runtime, "check_attention"),
    ]
    memory_requests = spy(monkeypatch, budget, "memory_request")
    decode_tiles = spy(monkeypatch, budget.RunMemory, "decode_tile")
    ckpt = tiny_checkpoint_source("t2v-A14B")
    argv = ["--ckpt-dir", str(ckpt), "--prompt-file", str(prompt_file(tmp_path, 2)), *BASE]
    monkeypatch.chdir(tmp_path)
    assert run_cli([*argv, "--use-magcache", "--magcache-thresh", "0.5"]) == 0

    assert len(recipe) == 2  # once per item, where its request is built
    assert len(magcache) == 2  # checked before loading, then passed on to the run
    assert sum(len(calls) for calls in attention) == 2  # --device cpu: checked with the request only
    assert len(decode_tiles) == 2  # the decode tile: planned once per request
    # the run plan's memory requests (one per item) and the decode tiles', all for the run's device
    assert len(memory_requests) == 4
    assert {str(kwargs["device"]) for _, kwargs in memory_requests} == {"cpu"}
    sidecars = sorted(tmp_path.glob("*.json"))
    assert len(sidecars) == 2 and all("memory_plan" in json.loads(p.read_text()) for p in sidecars)


@dataclass(frozen=True)
class FakePlan:
    cfg_batch: bool
    resident_blocks: int = 40
    activation_chunk: int | None = None
    t5_on_cpu: bool = False


def test_the_unbatched_fallback_replans_the_same_memory_requests(monkeypatch):
    """When the items disagree on CFG batching, the run replans them all unbatched from the memory
    requests it built once (for the run's device), not from new ones."""
    import wan.memory_plan

    seen = []

    def plan_cfg_batch(req, policy, *, budget_source):
        seen.append((req, policy))
        return FakePlan(cfg_batch=policy != "off" and req == "small")

    monkeypatch.setattr(wan.memory_plan, "plan_cfg_batch", plan_cfg_batch)
    plan = budget.combine_plans(["small", "large"], "if_free", "--gpu-memory 8")
    assert seen == [("small", "if_free"), ("large", "if_free"), ("small", "off"), ("large", "off")]
    assert plan.cfg_batch is False


@pytest.mark.parametrize(
    ("error", "sticky"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), False),
        (RuntimeError("CUDA error: out of memory"), False),
        (ValueError("bad image"), False),
    ],
)
def test_sticky_device_errors(error, sticky):
    assert run.is_sticky_device_error(error) is sticky


def test_a_batch_stops_after_a_sticky_gpu_error(tiny_checkpoint_source, tmp_path, monkeypatch, capsys):
    tried = []

    def failing(models, plan, reporter, **kwargs):
        tried.append(plan.request.prompt)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(run, "generate_one", failing)
    ckpt = tiny_checkpoint_source("t2v-A14B")
    monkeypatch.chdir(tmp_path)
    code = run_cli(["--ckpt-dir", str(ckpt), "--prompt-file", str(prompt_file(tmp_path, 3)), *BASE])
    out = capsys.readouterr().out
    assert code == EXIT_PARTIAL and tried == ["prompt number 0"]  # the later items were not started
    assert out.count("not run") >= 2 and "1 failed, 2 not run" in out
    assert list(tmp_path.glob("*.mp4")) == []
