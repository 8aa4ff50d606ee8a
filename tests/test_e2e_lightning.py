"""End to end, the 4-step distilled recipe: the installed `magcache-generate` with a Lightning-format LoRA
gives the frames the Lightning fork's own generate.py produced (`--lora_dir`, euler, 4 steps, shift 5,
guide 1: conditional forwards only), and the same request through the library gives its scheduler
timesteps/sigmas and final latent.

The golden folder is $MAGCACHE_E2E_LIGHTNING_DIR (default tests/golden_e2e_lightning: README.md,
manifest.json, lightning_t2v.safetensors, lightning_lora/); its checkpoint is the t2v-A14B folder of
the golden-e2e set ($MAGCACHE_E2E_DIR, default tests/golden_e2e). A missing or empty folder FAILS.
Tolerance as tests/test_e2e.py: frames mean abs <= 0.3 levels, max <= 8.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import typer.main
from goldens import assert_frames_match, installed_cli
from rich.console import Console
from safetensors.torch import load_file

from magcache_generate.argv import normalize_argv
from magcache_generate.cli import app
from magcache_generate.conditioner import Conditioner
from magcache_generate.models import Models
from magcache_generate.progress import Reporter
from magcache_generate.run_plan import RunPlan, plan_request
from magcache_generate.validate import GenerateOptions, build_request
from wan.configs import TASKS
from wan.sampling import sample
from wan.schedule import expert_for, make_schedule

HERE = Path(__file__).parent
LIGHTNING_DIR = Path(os.environ.get("MAGCACHE_E2E_LIGHTNING_DIR", HERE / "golden_e2e_lightning"))
E2E_DIR = Path(os.environ.get("MAGCACHE_E2E_DIR", HERE / "golden_e2e"))
REQUIRED = ("README.md", "manifest.json", "lightning_lora")

pytestmark = [pytest.mark.golden, pytest.mark.e2e]


def golden() -> dict:
    """The manifest; fails (never skips) when the golden folder is missing or incomplete."""
    missing = [name for name in REQUIRED if not (LIGHTNING_DIR / name).exists()]
    assert not missing, (
        f"Lightning golden folder {LIGHTNING_DIR} lacks {missing}; set MAGCACHE_E2E_LIGHTNING_DIR"
    )
    manifest = json.loads((LIGHTNING_DIR / "manifest.json").read_text())
    assert manifest.get("cases"), f"{LIGHTNING_DIR / 'manifest.json'} lists no cases"
    for entry in manifest["cases"].values():
        assert (LIGHTNING_DIR / entry["file"]).is_file(), f"{LIGHTNING_DIR / entry['file']} is missing"
    assert (E2E_DIR / "ckpt").is_dir(), (
        f"checkpoint folder {E2E_DIR / 'ckpt'} is missing; set MAGCACHE_E2E_DIR"
    )
    return manifest


def case_names() -> list[str]:
    path = LIGHTNING_DIR / "manifest.json"
    names = list(json.loads(path.read_text())["cases"]) if path.is_file() else []
    return names or ["<no golden cases found>"]  # one failing case instead of a silent skip


def cli_argv(entry: dict, frames_dir: Path) -> list[str]:
    subs = {
        "{ckpt_root}": str(E2E_DIR / "ckpt"),
        "{e2e_dir}": str(LIGHTNING_DIR),
        "{frames_dir}": str(frames_dir),
    }
    argv = []
    for arg in entry["cli_argv"]:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    return argv


@pytest.mark.parametrize("case", case_names())
def test_cli_reproduces_the_forks_frames(case, tmp_path):
    entry = golden()["cases"][case]
    frames_dir = tmp_path / "frames"
    argv = [*cli_argv(entry, frames_dir), "--save-file", str(tmp_path / "out.mp4"), "--device", "cpu"]
    proc = subprocess.run(installed_cli() + argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["sampling"]["dit_calls"] == entry["steps"]  # guide 1: one (conditional) forward per step
    assert sidecar["sampling"]["timesteps"] == entry["timesteps"][:-1]

    data = load_file(LIGHTNING_DIR / entry["file"])
    assert_frames_match(frames_dir, data, entry["frames"])


def request_for(argv: list[str]):
    """The Request the CLI builds from `argv` (parsed by the CLI's own option table)."""
    params = typer.main.get_command(app).make_context("magcache-generate", normalize_argv(argv)).params
    request = build_request(GenerateOptions.from_params(params))
    return dataclasses.replace(request, device="cpu")


@pytest.mark.parametrize("case", case_names())
def test_schedule_and_final_latent(case, tmp_path):
    """The CLI's request run through the library's stages: timesteps, sigmas, experts, final latent."""
    entry = golden()["cases"][case]
    data = load_file(LIGHTNING_DIR / entry["file"])
    request = request_for([*cli_argv(entry, tmp_path / "frames"), "--save-file", str(tmp_path / "o.mp4")])

    schedule = make_schedule(request.sample_solver, request.sample_steps, request.sample_shift)
    assert torch.equal(schedule.timesteps, data["sched.timesteps"][:-1])
    assert torch.equal(schedule.sigmas, data["sched.sigmas"])
    boundary = TASKS[request.task].boundary
    assert [expert_for(t, boundary) == "high" for t in schedule.timesteps] == data[
        "step.is_high_noise_expert"
    ].tolist()

    with Reporter(Console(quiet=True)) as reporter:
        run = RunPlan.build([request], keep_inactive=False)
        models = Models(run, request, reporter)
        conditioner = Conditioner(run, models)
        generator = torch.Generator(device="cpu").manual_seed(request.base_seed)
        context, context_null = conditioner.text(request.prompt, run.task.negative_prompt)
        noise, conditioning, _ = conditioner.latents(plan_request(request, run, None), generator)
        options = {"guide_scale": request.guide_scale, "boundary": boundary, "conditioning": conditioning}
        latent = sample(noise, schedule, models.experts, context, context_null, **options)
    expected = data["output.latent"]
    scale = max(1.0, expected.abs().max().item())
    assert (latent[0] - expected).abs().max().item() <= 1e-4 * scale
