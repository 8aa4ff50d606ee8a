"""--gpu-memory through the CLI: bad budgets fail before loading (one line, exit 2, nothing written);
a budget that forces streaming (the CPU fake split) gives the same video as the resident run."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import frames, run_cli

import wan.memory_costs as costs
import wan.memory_plan as mp
from magcache_generate.budget import SIMULATE_ENV, parse_gpu_memory
from magcache_generate.request import UserError
from wan.configs import TASKS
from wan.loading import read_transformer_config
from wan.testing.checkpoint import write_tiny_checkpoint

BASE = ["--size", "832*480", "--frame-num", "1", "--sample-steps", "3", "--base-seed", "3"]
LAYERS = 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-A14B"
    return write_tiny_checkpoint(root, "t2v-A14B", seed=4, num_layers=LAYERS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("8", 8.0), ("7.5GiB", 7.5), ("12gb", 12.0), (" 6G ", 6.0), ("auto", None), (None, None)],
)
def test_budget_values(value, expected):
    assert parse_gpu_memory(value) == expected


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan", "inf", "8TB", ""])
def test_bad_budgets_are_refused(value):
    with pytest.raises(UserError, match="--gpu-memory"):
        parse_gpu_memory(value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gpu-memory", "lots"], "is not a budget"),
        (["--gpu-memory", "0"], "is not a budget"),
        (["--gpu-memory", "8", "--device", "cpu"], "applies to GPU runs"),
    ],
)
def test_bad_budget_on_the_command_line(ckpt, tmp_path, capsys, extra, message):
    code = run_cli(["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / "v.mp4"), *BASE, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_budget_is_refused_when_auto_resolves_to_the_cpu(ckpt, tmp_path, capsys):
    code = run_cli(
        ["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / "v.mp4"), *BASE, "--gpu-memory", "8"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no CUDA device" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_infeasible_budget_exits_2_before_loading(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(SIMULATE_ENV, "0.05")
    loads = []
    monkeypatch.setattr("wan.experts.load_transformer", lambda *a, **k: loads.append(a))
    code = run_cli(
        ["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / "v.mp4"), "--device", "cpu", *BASE]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs at least" in err[0] and "GiB" in err[0]
    assert loads == [] and list(tmp_path.iterdir()) == []


def streaming_budget(ckpt: Path, resident: int) -> float:
    """A budget (GiB) at which the planner keeps exactly `resident` blocks of the tiny DiT resident."""
    dit = read_transformer_config(ckpt / "high_noise_model")
    task = TASKS["t2v-A14B"]
    req = mp.MemoryRequest(
        task,
        dit,
        832,
        480,
        1,
        budget=0,
        weight_bytes=4,
        t5_bytes=(ckpt / task.t5_checkpoint).stat().st_size,
        vae_bytes=(ckpt / task.vae_checkpoint).stat().st_size,
    )
    return (costs.denoise_stage(req, resident, None, False) + 1000) / mp.GIB


def test_streamed_run_through_the_cli_equals_the_resident_run(ckpt, tmp_path, monkeypatch):
    # Planner coefficients scaled so that a tiny model's activations, not its VAE or fixed costs,
    # set the budget: then a budget between two block counts forces streaming.
    monkeypatch.setattr(costs, "ACTIVATIONS", costs.ActivationModel(stream=20_000.0))
    monkeypatch.setattr(costs, "OVERHEADS", costs.Overheads(fixed=0, t5_activations=0))
    vae = {
        k: dataclasses.replace(v, per_pixel=0.0, encode_per_pixel=0.0) for k, v in costs.VAE_MODELS.items()
    }
    monkeypatch.setattr(costs, "VAE_MODELS", vae)

    def generate(name: str) -> None:
        argv = ["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / f"{name}.mp4"), "--device", "cpu"]
        assert run_cli([*argv, "--save-frames", str(tmp_path / name), *BASE]) == 0

    monkeypatch.delenv(SIMULATE_ENV, raising=False)
    generate("resident")
    monkeypatch.setenv(SIMULATE_ENV, repr(streaming_budget(ckpt, resident=2)))
    generate("streamed")

    assert np.array_equal(frames(tmp_path / "resident"), frames(tmp_path / "streamed"))
    resident = json.loads((tmp_path / "resident.json").read_text())
    streamed = json.loads((tmp_path / "streamed.json").read_text())
    assert "memory_plan" not in resident  # a plain CPU run plans nothing
    plan = streamed["memory_plan"]
    assert plan["resident_blocks"] == 2 and plan["streamed_blocks"] == LAYERS - 2
    assert SIMULATE_ENV in plan["budget_source"] and plan["device"] == "cpu"
    for record in (resident, streamed):
        memory = record["peak_memory"]
        assert memory["host_rss_gib"] > 0 and memory["gpu_allocated_gib"] is None
        assert memory["host_rss_scope"].startswith(("item", "process"))


def test_auto_budget_and_a_budget_above_the_card(monkeypatch):
    from magcache_generate.budget import resolve_budget
    from magcache_generate.request import Request

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * mp.GIB, 8 * mp.GIB))
    request = Request(
        "t2v-A14B", Path(), "x", "832*480", 5, "unipc", 2, 5.0, (1.0, 1.0), 0, Path("x.mp4"), gpu_memory=None
    )
    cuda = torch.device("cuda", 0)
    budget, source = resolve_budget(request, cuda)
    assert budget == 6 * mp.GIB - (mp.GIB // 2 + int(0.02 * 8 * mp.GIB)) and "auto" in source
    assert resolve_budget(dataclasses.replace(request, gpu_memory=7.5), cuda)[0] == int(7.5 * mp.GIB)
    with pytest.raises(UserError, match=r"more than cuda:0 has \(8\.0 GiB\)"):
        resolve_budget(dataclasses.replace(request, gpu_memory=12.0), cuda)


def test_magcache_residuals_are_freed_before_the_decode(ckpt, tmp_path, monkeypatch):
    import magcache_generate.render as run

    events = []
    release, decode = run.release_cache, run.decode_latent

    def recording_release(cache):
        release(cache)
        events.append(("release", len(cache.inner._residuals)))

    def recording_decode(*args, **kwargs):
        events.append(("decode", None))
        return decode(*args, **kwargs)

    monkeypatch.setattr(run, "release_cache", recording_release)
    monkeypatch.setattr(run, "decode_latent", recording_decode)
    argv = ["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / "m.mp4"), "--device", "cpu", *BASE]
    assert run_cli([*argv, "--use-magcache", "--magcache-thresh", "1e-12"]) == 0
    assert events == [("release", 0), ("decode", None)]
