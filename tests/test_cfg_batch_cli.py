"""`--cfg-batch auto|on|off`: the planner's choice (room for the doubled activations, or not), the run's
decision and its report, and the CLI: `on` gives the frames of `off` within rounding, bad values and an
unfittable `on` exit 2 before loading."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wan.memory_costs as costs
import wan.memory_plan as mp
from magcache_generate import cli
from magcache_generate.budget import SIMULATE_ENV, memory_request, plan_run
from magcache_generate.cfg_batching import decide_cfg_batch, planner_policy
from magcache_generate.request import Request, UserError
from magcache_generate.validate import GenerateOptions, build_request
from wan.configs import TASKS
from wan.loading import read_transformer_config
from wan.memory_plan import GIB, MemoryRequest, PlanInfeasibleError, plan_cfg_batch
from wan.modules.transformer import TransformerConfig

A14B = TransformerConfig("t2v", 16, 16, 5120, 13824, 40, 40)
TI2V = TransformerConfig("ti2v", 48, 48, 3072, 14336, 24, 30)


def memory(gib: float, task="t2v-A14B", dit=A14B, size=(832, 480), frames=81, **kw) -> MemoryRequest:
    return MemoryRequest(TASKS[task], dit, *size, frames, budget=int(gib * GIB), weight_bytes=2, **kw)


# ------------------------------------------------------------------------------------ the planner


@pytest.mark.parametrize("chunk", [None, 4096])
@pytest.mark.parametrize("per_token", [False, True], ids=["t", "per-token-t"])
def test_batched_activations_are_about_twice_one_forward(chunk, per_token):
    req = memory(80, task="ti2v-5B", dit=TI2V, size=(1280, 704), frames=121, image=per_token)
    one = costs.ACTIVATIONS.forward_bytes(req, chunk)
    two = costs.ACTIVATIONS.forward_bytes(dataclasses.replace(req, cfg_batch=True), chunk)
    assert two == 2 * one - costs.ACTIVATIONS.fixed  # everything per token doubles, the fixed part not
    cached = dataclasses.replace(
        req, residual_cache=True
    )  # MagCache residuals: one slot per branch either way
    residuals = costs.ACTIVATIONS.forward_bytes(cached, chunk) - one
    assert (
        costs.ACTIVATIONS.forward_bytes(dataclasses.replace(cached, cfg_batch=True), chunk) - two == residuals
    )


def test_a_large_budget_batches_and_keeps_everything_else():
    plain = plan_cfg_batch(memory(76), "off")
    batched = plan_cfg_batch(memory(76), "if_free")
    assert not plain.cfg_batch and batched.cfg_batch
    assert (batched.resident_blocks, batched.activation_chunk, batched.t5_on_cpu, batched.vae_tile_px) == (
        plain.resident_blocks,
        plain.activation_chunk,
        plain.t5_on_cpu,
        plain.vae_tile_px,
    )
    assert batched.estimates["denoise"] > plain.estimates["denoise"]  # the doubled activations are planned
    assert batched.to_json()["cfg_batch"] is True and plain.to_json()["cfg_batch"] is False
    assert "CFG steps: one batch-2 forward" in batched.render()
    assert "CFG steps: two forwards" in plain.render()


@pytest.mark.parametrize("gib", [32, 16, 8])
def test_a_tight_budget_prefers_resident_blocks_to_batching(gib):
    """Where batching would cost resident blocks (or chunking), auto does not batch; on does, and pays."""
    plain = plan_cfg_batch(memory(gib), "off")
    auto = plan_cfg_batch(memory(gib), "if_free")
    forced = plan_cfg_batch(memory(gib), "on")
    assert auto == plain and not auto.cfg_batch
    assert forced.cfg_batch and forced.resident_blocks < plain.resident_blocks
    assert all(v <= forced.budget for v in forced.estimates.values())
    if forced.streamed_blocks:
        assert "CFG steps: one batch-2 forward (half the streamed block copies)" in forced.render()


def test_on_is_refused_when_only_two_forwards_fit():
    req = memory(12, size=(1280, 720))
    plan_cfg_batch(req, "off")  # fits as two forwards
    with pytest.raises(
        PlanInfeasibleError, match=r"^--cfg-batch on: one batch-2 CFG forward .* needs at least"
    ):
        plan_cfg_batch(req, "on")
    with pytest.raises(
        PlanInfeasibleError, match="needs at least"
    ) as info:  # nothing fits: the usual message
        plan_cfg_batch(memory(4, size=(1280, 720)), "on")
    assert "--cfg-batch" not in str(info.value)
    with pytest.raises(ValueError, match="not one of"):
        plan_cfg_batch(req, "maybe")


# ------------------------------------------------------------------------------------ the run's decision


def a14b_request(**kw) -> Request:
    base = Request(
        "t2v-A14B",
        Path(),
        "x",
        "832*480",
        81,
        "unipc",
        40,
        12.0,
        (3.0, 4.0),
        0,
        Path("x.mp4"),
        convert_model_dtype=True,
    )
    return dataclasses.replace(base, **kw)


@pytest.fixture
def cuda_with_80_gib(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * GIB, 80 * GIB))
    return torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("kw", "batched", "reason"),
    [
        ({}, True, "has room"),
        ({"gpu_memory": 16.0}, False, "budget is tight"),
        ({"gpu_memory": 16.0, "cfg_batch": "on"}, True, "--cfg-batch on"),
        ({"cfg_batch": "off"}, False, "--cfg-batch off"),
        ({"guide_scale": (1.0, 1.0)}, False, "no CFG step"),
    ],
)
def test_the_runs_decision_on_cuda(cuda_with_80_gib, kw, batched, reason):
    requests = [a14b_request(**kw)]
    run_memory = plan_run(requests, A14B, cuda_with_80_gib, batch=False)
    decision = decide_cfg_batch(requests, "cuda", run_memory)
    assert decision.batched == batched == run_memory.plan.cfg_batch and reason in decision.reason
    assert run_memory.to_json(requests[0])["cfg_batch"] == batched


def test_on_that_cannot_fit_is_one_user_error(cuda_with_80_gib):
    request = a14b_request(size="1280*720", gpu_memory=12.0, cfg_batch="on")
    with pytest.raises(UserError, match=r"--cfg-batch on: .* use --cfg-batch auto"):
        plan_run([request], A14B, cuda_with_80_gib, batch=False)
    plan_run([dataclasses.replace(request, cfg_batch="auto")], A14B, cuda_with_80_gib, batch=False)


def test_a_batch_is_batched_only_when_every_item_has_room(cuda_with_80_gib):
    small, large = a14b_request(gpu_memory=36.0), a14b_request(gpu_memory=36.0, size="1280*720")
    assert plan_run([small], A14B, cuda_with_80_gib, batch=True).plan.cfg_batch
    assert not plan_run([large], A14B, cuda_with_80_gib, batch=True).plan.cfg_batch
    both = plan_run([small, large], A14B, cuda_with_80_gib, batch=True)
    unbatched = plan_run(
        [dataclasses.replace(r, cfg_batch="off") for r in (small, large)], A14B, cuda_with_80_gib, batch=True
    )
    assert not both.plan.cfg_batch and both.plan == unbatched.plan  # every item planned as two forwards


def test_cpu_runs_batch_only_when_asked():
    for mode, policy in (("auto", "off"), ("off", "off"), ("on", "on")):
        requests = [a14b_request(cfg_batch=mode)]
        assert planner_policy(requests, "cpu") == policy
        assert decide_cfg_batch(requests, "cpu", None).batched == (mode == "on")
    assert planner_policy([a14b_request()], "cuda") == "if_free"


def test_bad_values_are_refused_when_building_the_request():
    with pytest.raises(UserError, match="--cfg-batch 'yes' is not one of auto, on, off"):
        build_request(GenerateOptions(cfg_batch="yes"), check_checkpoint=False)


# ------------------------------------------------------------------------------------ the CLI

BASE = ["--size", "832*480", "--frame-num", "1", "--sample-steps", "6", "--base-seed", "3", "--device", "cpu"]


def run_cli(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def frames(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]).astype(np.int16)


def test_on_gives_the_frames_of_off_with_the_same_magcache_counts(tiny_checkpoint_source, tmp_path, capsys):
    ckpt = tiny_checkpoint_source("t2v-A14B")
    magcache = ["--use-magcache", "--magcache-thresh", "0.3", "--retention-ratio", "0"]  # skips steps 1, 2
    records = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        argv = ["--ckpt-dir", str(ckpt), "--save-file", str(out) + ".mp4", "--save-frames", str(out), *BASE]
        assert run_cli([*argv, *magcache, "--cfg-batch", mode]) == 0
        records[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
        assert "CFG batch" in capsys.readouterr().out
    diff = np.abs(frames(tmp_path / "on") - frames(tmp_path / "off"))
    assert diff.max() <= 1  # float rounding may move a pixel across a uint8 step, no more
    on, off = records["on"], records["off"]
    assert on["cfg_batch"] == {
        "requested": "on",
        "batched": True,
        "reason": "--cfg-batch on; a CPU run: allowed for testing, no speed gain",
        "batched_steps": 6,
        "cfg_steps": 6,
    }
    assert off["cfg_batch"]["batched"] is False and off["cfg_batch"]["batched_steps"] == 0
    assert (
        on["sampling"]["dit_calls_by_branch"]
        == off["sampling"]["dit_calls_by_branch"]
        == {"cond": 6, "uncond": 6}
    )
    for key in ("calls", "forwards", "dense_forwards", "ideal_speedup"):
        assert on["magcache"][key] == off["magcache"][key], key
    assert on["magcache"]["forwards"] == 8


def test_auto_on_the_cpu_keeps_two_forwards(tiny_checkpoint_source, tmp_path):
    ckpt = tiny_checkpoint_source("t2v-A14B")
    argv = ["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / "a.mp4"), *BASE, "--sample-steps", "2"]
    assert run_cli(argv) == 0
    record = json.loads((tmp_path / "a.json").read_text())["cfg_batch"]
    assert (record["requested"], record["batched"], record["batched_steps"]) == ("auto", False, 0)
    assert "off on the CPU" in record["reason"]


@pytest.mark.parametrize("value", ["yes", "ON", "2"])
def test_bad_values_exit_2(tiny_checkpoint_source, tmp_path, capsys, value):
    ckpt = tiny_checkpoint_source("t2v-A14B")
    code = run_cli(
        ["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / "v.mp4"), *BASE, "--cfg-batch", value]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--cfg-batch" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_on_that_does_not_fit_the_simulated_budget_exits_2_before_loading(
    tiny_checkpoint_source, tmp_path, capsys, monkeypatch
):
    ckpt = tiny_checkpoint_source("t2v-A14B")
    # Coefficients scaled so that the tiny model's activations, not its VAE or fixed costs, set the budget.
    monkeypatch.setattr(costs, "ACTIVATIONS", costs.ActivationModel(stream=200_000.0))
    monkeypatch.setattr(costs, "OVERHEADS", costs.Overheads(fixed=0, t5_activations=0))
    argv = ["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / "v.mp4"), *BASE]
    request = build_request(cli.GenerateOptions(ckpt_dir=ckpt, size="832*480", frame_num=1, device="cpu"))
    req = memory_request(request, read_transformer_config(ckpt / "high_noise_model"), 0, batch=False)
    between = (mp.minimum_budget(req) + mp.minimum_budget(dataclasses.replace(req, cfg_batch=True))) / 2
    assert mp.minimum_budget(req) < between < mp.minimum_budget(dataclasses.replace(req, cfg_batch=True))
    monkeypatch.setenv(SIMULATE_ENV, repr(between / GIB))
    loads = []
    monkeypatch.setattr("wan.experts.load_transformer", lambda *a, **k: loads.append(a))
    code = run_cli([*argv, "--cfg-batch", "on"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --cfg-batch on: one batch-2 CFG forward")
    assert loads == [] and list(tmp_path.iterdir()) == []
