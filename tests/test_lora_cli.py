"""`--lora`, `--lora-high/-low`, `--lora-dir` and `--distilled` through the CLI, on tiny checkpoints: a LoRA
changes the frames and scale 0 does not, the sidecar records it, and every bad LoRA input is one line,
exit 2, nothing written (found from the headers before any weight loads)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import FAST_A14B as FAST
from cli_runs import frames
from lora_files import MODULES, lowrank_factors, write_lora

from magcache_generate.argv import normalize_argv
from magcache_generate.cli import main
from magcache_generate.command import demo_defaults
from magcache_generate.loras import parse_lora_arg
from magcache_generate.request import LoraChoice, UserError
from magcache_generate.validate import GenerateOptions, build_request
from wan.lora import checkpoint_shapes
from wan.modules.transformer import WanTransformer
from wan.testing.checkpoint import write_tiny_checkpoint
from wan.testing.dit import tiny_transformer_config


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-A14B", "t2v-A14B", seed=3)


@pytest.fixture(scope="module")
def lora(ckpt, tmp_path_factory) -> Path:
    shapes = checkpoint_shapes(ckpt / "high_noise_model")
    factors = lowrank_factors(shapes, MODULES, rank=4, seed=11)
    # strong enough to move the uint8 frames of a random tiny model
    factors = {k: (d * 6, u * 6) for k, (d, u) in factors.items()}
    return write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors", factors, "kohya", alpha=4.0)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def generate(ckpt, tmp_path, name, extra, capsys) -> np.ndarray:
    argv = ["--ckpt-dir", str(ckpt), "--save-file", str(tmp_path / f"{name}.mp4")]
    argv += ["--save-frames", str(tmp_path / name), *FAST, *extra]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    return frames(tmp_path / name)


def test_lora_changes_the_frames_and_scale_zero_does_not(ckpt, lora, tmp_path, capsys):
    base = generate(ckpt, tmp_path, "base", [], capsys)
    styled = generate(ckpt, tmp_path, "styled", ["--lora", f"{lora}:1.5"], capsys)
    zero = generate(ckpt, tmp_path, "zero", ["--lora", f"{lora}:0"], capsys)
    assert np.abs(styled.astype(int) - base.astype(int)).mean() > 0.5
    assert np.array_equal(zero, base)

    sidecar = json.loads((tmp_path / "styled.json").read_text())
    (record,) = sidecar["loras"]
    assert record["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert (record["path"], record["scale"], record["experts"]) == (str(lora.resolve()), 1.5, ["high", "low"])
    sampling = sidecar["sampling"]
    assert (sampling["solver"], sampling["steps"], sampling["shift"], sampling["guide_scale"]) == (
        "euler",
        4,
        5.0,
        [1, 1],
    )
    assert sampling["dit_calls"] == 4 and sampling["distilled"] == "lightning"
    assert sampling["timesteps"] == [1000.0, 937.5, 833.3333129882812, 625.0]


@pytest.fixture
def forbidden_run(monkeypatch):
    fake = types.ModuleType("magcache_generate.run")

    def run_requests(requests, *, console, debug=False, startup=None, magcache=None):
        raise AssertionError("bad input reached run_requests")

    fake.run_requests = run_requests
    monkeypatch.setitem(sys.modules, "magcache_generate.run", fake)


def test_bad_lora_inputs_are_one_line_exit_2_nothing_written(
    ckpt, lora, tmp_path, forbidden_run, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    wide = tiny_transformer_config("t2v", dim=64, ffn_dim=128)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanTransformer(wide).state_dict().items()}
    wrong_width = write_lora(
        tmp_path / "loras" / "wide.safetensors", lowrank_factors(shapes, MODULES), "kohya"
    )
    not_a_lora = next((ckpt / "high_noise_model").glob("*.safetensors"))
    lora_dir = tmp_path / "loras" / "half"
    lora_dir.mkdir()
    (lora_dir / "high_noise_model.safetensors").write_bytes(lora.read_bytes())
    # --lora-high on ti2v-5B is refused with the request, before the checkpoint is looked at
    cases = {
        "wrong width": (
            ["--lora", str(wrong_width)],
            r"--lora: LoRA '.*wide.safetensors' does not fit the high-noise transformer \(dim 32\)",
        ),
        "not a LoRA": (
            ["--lora-low", str(not_a_lora)],
            r"--lora-low: LoRA '.*' is not a LoRA: .*its keys look like",
        ),
        "scale": (
            ["--lora", f"{lora}:strong"],
            r"--lora '.*style.safetensors:strong': scale 'strong' is not a number",
        ),
        "missing": (["--lora", str(tmp_path / "nope.safetensors")], r"--lora '.*nope.safetensors' not found"),
        "missing in dir": (
            ["--lora-dir", str(lora_dir)],
            r"--lora-dir '.*half' has no low_noise_model.safetensors",
        ),
        "ti2v high": (
            ["--task", "ti2v-5B", "--size", "1280*704", "--lora-high", str(lora)],
            r"--lora-high applies to the high-noise expert of the A14B tasks; ti2v-5B has one model",
        ),
    }
    before = {p for p in tmp_path.rglob("*")}
    for name, (extra, pattern) in cases.items():
        argv = ["--ckpt-dir", str(ckpt), *FAST, "--save-file", "out.mp4", *extra]
        code, _, err = run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert re.search(pattern, lines[0]), (name, lines[0])
    assert {p for p in tmp_path.rglob("*")} == before  # nothing written


def test_lora_dir_and_distilled_resolution(ckpt, lora, tmp_path):
    lora_dir = tmp_path / "lightning"
    lora_dir.mkdir()
    for name in ("high_noise_model.safetensors", "low_noise_model.safetensors"):
        (lora_dir / name).write_bytes(lora.read_bytes())
    base = GenerateOptions(task="t2v-A14B", ckpt_dir=ckpt, save_file=tmp_path / "o.mp4")
    implied = build_request(dataclasses.replace(base, lora_dir=[lora_dir]))
    assert implied.distilled == "lightning" and implied.sample_solver == "euler"
    assert (implied.sample_steps, implied.sample_shift, implied.guide_scale) == (4, 5.0, (1.0, 1.0))
    assert implied.loras == (
        LoraChoice(lora_dir / "high_noise_model.safetensors", 1.0, "high", "--lora-dir"),
        LoraChoice(lora_dir / "low_noise_model.safetensors", 1.0, "low", "--lora-dir"),
    )
    kept = build_request(dataclasses.replace(base, lora_dir=[lora_dir], distilled="none"))
    assert (kept.distilled, kept.sample_solver, kept.sample_steps, kept.guide_scale) == (
        None,
        "unipc",
        40,
        (3.0, 4.0),
    )
    user = build_request(
        dataclasses.replace(base, distilled="lightning", sample_steps=8, sample_guide_scale="1 2")
    )
    assert (user.sample_steps, user.guide_scale, user.sample_solver) == (8, (1.0, 2.0), "euler")
    demo = build_request(dataclasses.replace(base, distilled="lightning"), defaults=demo_defaults("t2v-A14B"))
    assert demo.sample_steps == 4  # the recipe's step count wins over the demo's 8
    assert (demo.frame_num, demo.size) == (5, "832*480")  # the demo's fill what the recipe leaves
    with pytest.raises(UserError, match="unknown --distilled 'turbo'"):
        build_request(dataclasses.replace(base, distilled="turbo"))
    ti2v = build_request(
        GenerateOptions(task="ti2v-5B", lora=[f"{lora}:0.5"], save_file=tmp_path / "t.mp4"),
        check_checkpoint=False,
    )
    assert ti2v.loras == (LoraChoice(lora, 0.5, "all", "--lora"),)


def test_upstream_spellings_and_scale_forms(tmp_path):
    assert normalize_argv(["--lora_dir", "a", "--lora_dir2", "b", "--sample_solver", "euler"]) == [
        "--lora-dir=a",
        "--lora-dir=b",
        "--sample-solver=euler",
    ]
    assert parse_lora_arg("x.safetensors", "--lora") == (Path("x.safetensors"), 1.0)
    assert parse_lora_arg("x.safetensors:0.8", "--lora") == (Path("x.safetensors"), 0.8)
    assert parse_lora_arg("dir:with:colons/x.safetensors:-1e-1", "--lora") == (
        Path("dir:with:colons/x.safetensors"),
        -0.1,
    )
    odd = tmp_path / "a:b.safetensors"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd), "--lora") == (odd, 1.0)  # an existing file name is taken whole
    for bad in ("x.safetensors:", "x.safetensors:nan", ":2"):
        with pytest.raises(UserError):
            parse_lora_arg(bad, "--lora")


def test_notes_before_loading(ckpt, lora, tmp_path, monkeypatch, capsys):
    """--lora-dir implies the recipe and says so; MagCache at 4 steps says it skips nothing, before any load."""
    seen = []
    fake = types.ModuleType("magcache_generate.run")
    fake.run_requests = lambda requests, *, console, debug=False, startup=None, magcache=None: (
        seen.extend(requests) or [{}]
    )
    monkeypatch.setitem(sys.modules, "magcache_generate.run", fake)
    lora_dir = tmp_path / "lightning"
    lora_dir.mkdir()
    for name in ("high_noise_model.safetensors", "low_noise_model.safetensors"):
        (lora_dir / name).write_bytes(lora.read_bytes())
    argv = [
        "--ckpt_dir",
        str(ckpt),
        "--lora_dir",
        str(lora_dir),
        "--use_magcache",
        "--save-file",
        str(tmp_path / "o.mp4"),
    ]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert (
        "--distilled lightning (implied by --lora-dir" in text
        and "euler, 4 steps, shift 5, guide scale 1/1" in text
    )
    assert "conditional forward only" in text
    assert "MagCache skips nothing at 4 steps" in text and "--magcache-calibrate FILE" in text
    assert len(seen) == 1 and seen[0].sample_steps == 4
    code, out, _ = run(
        ["--ckpt-dir", str(ckpt), "--distilled", "lightning", "--save-file", str(tmp_path / "p.mp4")], capsys
    )
    assert code == 0 and "without a LoRA" in " ".join(out.split())
