"""Messages a user can act on: the quick-start demo plans without warnings, checkpoint hints name the
task's own layout, a size that is not allowed lists the allowed ones, no summary line runs past 100
columns in a pipe, and a long prompt is echoed cut with an ellipsis."""

from __future__ import annotations

import io

import pytest
from cli_runs import run_cli
from PIL import Image

from magcache_generate.command import demo_defaults
from magcache_generate.plan_check import check_magcache_plan
from magcache_generate.progress import make_console, print_message, print_result
from magcache_generate.run import short_prompt
from magcache_generate.validate import GenerateOptions, build_request
from wan.configs import TASKS
from wan.memory_plan import MemoryPlan

GIB = 2**30


@pytest.mark.parametrize("task", list(TASKS))
def test_the_demo_plans_magcache_without_warnings(task, tmp_path):
    image = None
    if TASKS[task].image == "required":
        image = tmp_path / "first.png"
        Image.new("RGB", (64, 64)).save(image)
    options = GenerateOptions(task=task, use_magcache=True, image=image)
    request = build_request(options, check_checkpoint=False, defaults=demo_defaults(task))
    plan = check_magcache_plan(request)
    assert plan.warnings == ()


def test_official_mode_still_warns_about_resampling():
    options = GenerateOptions(use_magcache=True, magcache_mode="official", sample_steps=8)
    plan = check_magcache_plan(build_request(options, check_checkpoint=False))
    assert any("resampling it" in w for w in plan.warnings)


def test_ti2v_on_an_a14b_folder_names_the_right_layout(make_checkpoint, tmp_path, capsys):
    a14b = make_checkpoint(tmp_path / "Wan2.2-T2V-A14B", "t2v-A14B")
    assert run_cli(["--task", "ti2v-5B", "--ckpt-dir", str(a14b), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "this is an A14B folder" in err and "Wan2.2-TI2V-5B" in err
    assert "e.g. high_noise_model/" not in err


def test_a14b_on_a_5b_folder_names_the_right_layout(make_checkpoint, tmp_path, capsys):
    five = make_checkpoint(tmp_path / "Wan2.2-TI2V-5B", "ti2v-5B")
    assert run_cli(["--task", "t2v-A14B", "--ckpt-dir", str(five), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "ti2v-5B layout" in err and "--task ti2v-5B" in err


def test_a_size_not_allowed_lists_the_allowed_ones(capsys):
    assert run_cli(["--size", "1920*1080", "--demo"]) == 2
    err = capsys.readouterr().err
    assert "1280*720" in err and "832*480" in err


def test_long_prompts_are_cut_with_an_ellipsis():
    long = "a cat " * 40
    cut = short_prompt(long)
    assert cut.endswith("…'") and len(cut) <= 62
    assert short_prompt("a red kite\nat dawn") == "'a red kite at dawn'"


def test_summary_lines_fit_100_columns_in_a_pipe():
    out = io.StringIO()
    result = {
        "task": "t2v-A14B",
        "seed": 7,
        "timings_s": {"encode_text": 1.5, "denoise": 8.0},
        "steps_run": 4,
        "peak_memory": {"host_rss_gib": 1.0},
        "request": {"sidecar": False},
        "summary_rows": [
            ("CFG batch", "off: auto: off on the CPU (no speed gain; the reference call pattern)"),
            ("time to first step", "10.64 (" + ", ".join(f"part{i} 0.{i}1" for i in range(12)) + ")"),
        ],
    }
    console = make_console(out)
    assert not console.is_terminal
    print_result(console, result)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "CFG batch: off: auto: off on the CPU (no speed gain; the reference call pattern)" in lines
    assert max(len(line) for line in lines[:6]) < 60  # no table row padded to a sentence's width
    assert any(line.startswith("time to first step: 10.64 (part0") for line in lines)


def test_the_memory_plan_block_fits_100_columns():
    plan = MemoryPlan(
        budget=8 * GIB,
        num_layers=40,
        resident_blocks=10,
        block_bytes=GIB // 2,
        t5_on_cpu=True,
        vae_tile_px=256,
        activation_chunk=4096,
        estimates={"text": GIB, "denoise": 7 * GIB, "decode": 6 * GIB},
        tokens=32760,
        cfg_batch=True,
        weights="fp32 (Linears stored bf16 for autocast)",
    )
    text = plan.render("--gpu-memory auto (77.1 GiB free on cuda:0 minus a margin)")
    assert max(len(line) for line in text.splitlines()) <= 100


def test_long_messages_wrap_at_100_columns_in_a_pipe():
    out = io.StringIO()
    console = make_console(out)
    words = ["word"] * 60 + ["/a/long/path/" + "x" * 120]
    print_message(console, "[yellow]note[/]: " + " ".join(words))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("note: ") and all(line.startswith("  ") for line in lines[1:])
    assert all(len(line) <= 100 for line in lines if "/a/long/path/" not in line)
    assert " ".join(out.getvalue().split()) == "note: " + " ".join(words)  # nothing cut or lost
