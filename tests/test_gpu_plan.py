"""`--magcache-plan --gpu-memory GB`: the memory plan for a card of that size on a machine without a GPU,
loading nothing; and a real run without a GPU refuses `--gpu-memory` before printing anything."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _plan_table():
    spec = importlib.util.spec_from_file_location("plan_table", ROOT / "benchmarks" / "plan_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_table"] = module
    spec.loader.exec_module(module)
    return module


def test_plan_for_a_card_prints_the_memory_plan(capsys):
    assert run_cli(["--magcache-plan", "--gpu-memory", "24", "--size", "1280*720"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for a 24 GiB GPU: t2v-A14B 1280*720, 81 frames" in out
    for field in ("DiT blocks", "text encoder", "VAE decode", "CFG steps", "peak denoise", "host RAM"):
        assert field in out
    assert "curve" not in out  # the MagCache schedule only with --use-magcache
    assert max(len(line) for line in out.splitlines()) <= 100


@pytest.mark.parametrize(
    ("task", "size", "budget"), [("t2v-A14B", "1280*720", 24), ("ti2v-5B", "1280*704", 16)]
)
def test_plan_json_agrees_with_the_plan_table(task, size, budget, capsys):
    """The CLI's figures are the planner's, as benchmarks/plan_table.py computes them (MagCache on; the
    table plans two forwards per CFG step)."""
    argv = [
        "--magcache-plan",
        "--json",
        "--use-magcache",
        "--cfg-batch",
        "off",
        "--task",
        task,
        "--size",
        size,
    ]
    assert run_cli([*argv, "--gpu-memory", str(budget)]) == 0
    memory = json.loads(capsys.readouterr().out)["memory_plan"]
    width, height = map(int, size.split("*"))
    frames = 81 if task != "ti2v-5B" else 121
    row = _plan_table().row(task, width, height, frames, budget)
    assert memory["resident_blocks"] == row["resident_blocks"]
    assert memory["t5_on_cpu"] == row["t5_on_cpu"]
    assert memory["vae_tile_px"] == row["vae_tile_px"]
    assert round(max(memory["estimated_peak_gib"].values()), 1) == row["peak_gib"]
    assert memory["host_ram_gib_estimate"] == row["host_ram_gib"]


def test_plan_for_a_card_too_small_names_the_minimum(capsys):
    assert run_cli(["--magcache-plan", "--gpu-memory", "4", "--size", "1280*720"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --gpu-memory 4") and "needs at least" in err


def test_plan_refuses_auto(capsys):
    assert run_cli(["--magcache-plan", "--gpu-memory", "auto"]) == 2
    assert "--gpu-memory GB" in capsys.readouterr().err


def test_run_without_gpu_refuses_a_budget_before_printing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["--demo", "--gpu-memory", "8"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "--magcache-plan" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_plan_for_a_card_follows_the_weight_options(capsys):
    def block_gib(*extra: str) -> float:
        assert run_cli(["--magcache-plan", "--json", "--gpu-memory", "12", "--size", "1280*720", *extra]) == 0
        return json.loads(capsys.readouterr().out)["memory_plan"]["block_gib"]

    assert block_gib("--quantize", "fp8") < 0.6 * block_gib()


def test_plan_for_a_card_is_one_ranks_under_ulysses_and_fsdp(capsys):
    def plan(*extra: str) -> dict:
        argv = ["--magcache-plan", "--json", "--gpu-memory", "80", "--size", "1280*720", *extra]
        assert run_cli(argv) == 0
        return json.loads(capsys.readouterr().out)["memory_plan"]

    single, fsdp = plan(), plan("--ulysses-size", "8", "--dit-fsdp")
    assert (single["sequence_shards"], single["weight_shards"]) == (1, 1)
    assert (fsdp["sequence_shards"], fsdp["weight_shards"], fsdp["streamed_blocks"]) == (8, 8, 0)
    assert fsdp["estimated_peak_gib"]["denoise"] < single["estimated_peak_gib"]["denoise"]
    assert (
        run_cli(["--magcache-plan", "--gpu-memory", "80", "--ulysses-size", "8", "--size", "1280*720"]) == 0
    )
    assert "Ulysses group  : 8 GPUs, 1/8 of the tokens on each" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ulysses-size", "3"], "--ulysses-size 3 does not divide the 40 attention heads of t2v-A14B"),
        (["--ulysses-size", "4", "--dit-fsdp", "--offload-model", "True"], "drop --offload-model True"),
        (["--dit-fsdp"], "--dit-fsdp needs several processes"),
    ],
)
def test_plan_for_a_card_checks_the_layout(extra, message, capsys):
    assert run_cli(["--magcache-plan", "--gpu-memory", "80", *extra]) == 2
    assert message in capsys.readouterr().err
