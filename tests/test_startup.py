"""Time to first step: the clock's parts, the process-start origin, and a CLI run's sidecar and summary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magcache_generate.startup import (
    MILESTONES,
    ORIGIN_PROCESS,
    FirstStepTimer,
    StartupClock,
    seconds_since_process_start,
)
from wan.testing.checkpoint import write_tiny_checkpoint

PARTS = ["startup", "validation", "imports", "setup", "text", "conditioning", "load", "first_step"]


def test_parts_add_up_to_the_total_in_order():
    clock = StartupClock(origin=100.0, origin_source="test", now=101.0)
    assert clock.report() is None  # not before the first step
    for i, (name, _) in enumerate(MILESTONES):
        clock.mark(name, 101.0 + i)
    clock.mark("text_start", 500.0)  # a later item's mark changes nothing
    clock.load_s = 0.25
    report = clock.report()
    assert list(report["parts_s"]) == PARTS
    assert report["total_s"] == pytest.approx(len(MILESTONES))
    assert sum(report["parts_s"].values()) == pytest.approx(report["total_s"])
    assert report["parts_s"]["load"] == 0.25 and report["parts_s"]["first_step"] == 0.75
    assert list(report["at_s"].values()) == sorted(report["at_s"].values())


def test_first_step_timer_keeps_the_first_step_only():
    clock = StartupClock()
    for name in ("validated", "runtime_imported", "text_start", "text_done"):
        clock.mark(name)
    timer = FirstStepTimer(clock, torch.device("cpu"))
    timer.start()
    timer.step_done(0.5)
    timer.step_done(0.9)  # the second step's loads are not the first's
    timer.finish()
    assert clock.load_s == 0.5 and clock.complete
    assert clock.marks["denoise_start"] <= clock.marks["first_step_done"]
    # a second denoising (--magcache-verify's, a batch's next item) leaves the clock alone
    first_end = clock.marks["first_step_done"]
    again = FirstStepTimer(clock, torch.device("cpu"))
    again.start()
    again.step_done(7.0)
    again.finish()
    assert clock.marks["first_step_done"] == first_end and clock.load_s == 0.5


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_process_start_is_read_from_the_kernel():
    code = "from magcache_generate.startup import seconds_since_process_start as s; print(s())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 0.0 < float(out) < 120.0  # the child's own interpreter start and imports
    assert seconds_since_process_start() is not None  # this process: readable too
    assert StartupClock().origin_source == ORIGIN_PROCESS


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_cli_batch_reports_time_to_first_step_and_text_stage(tmp_path):
    """A two-item batch: the first sidecar times the whole start, the second loads nothing again."""
    ckpt = write_tiny_checkpoint(tmp_path / "Wan2.2-T2V-A14B", "t2v-A14B", seed=3)
    items = [
        {"prompt": "a red ball", "save_file": str(tmp_path / "a.mp4")},
        {"prompt": "a blue ball rolls on the grass", "save_file": str(tmp_path / "b.mp4")},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    argv = ["--ckpt-dir", str(ckpt), "--prompt-file", str(prompts), "--size", "832*480"]
    argv += ["--frame-num", "1", "--sample-steps", "2", "--base-seed", "7", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "magcache_generate", *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = json.loads((tmp_path / "a.json").read_text())
    second = json.loads((tmp_path / "b.json").read_text())

    report = first["time_to_first_step"]
    assert report["origin"] == ORIGIN_PROCESS
    assert list(report["parts_s"]) == PARTS
    assert all(seconds >= 0 for seconds in report["parts_s"].values())
    assert report["parts_s"]["startup"] > 0  # the interpreter's start, before any of our code
    assert sum(report["parts_s"].values()) == pytest.approx(report["total_s"], abs=1e-3)
    at = list(report["at_s"].values())
    assert list(report["at_s"]) == [name for name, _ in MILESTONES] and at == sorted(at)
    assert report["at_s"]["first_step_done"] == report["total_s"]
    assert {"imports", "tokenizer", "t5_read", "encode"} <= set(report["text_s"])
    assert report["text_s"] == first["text_stage_s"]

    # the tokenizer and umT5 are loaded once per batch: the second item only encodes
    assert second["time_to_first_step"] is None
    assert set(second["text_stage_s"]) == {"encode", "other"}
    assert "time to first step" in proc.stdout and "text stage" in proc.stdout


def test_a_batch_encodes_a_shared_prompt_once(tmp_path):
    """encode_timed reuses known contexts (a batch's negative prompt) and keeps only a few."""
    from magcache_generate.text_stage import KEEP_CONTEXTS, encode_timed
    from wan.testing.text import tiny_t5_state_dict, write_tiny_tokenizer
    from wan.text_encoder import text_encoder_from_state_dict
    from wan.tokenizer import load_tokenizer

    encoder = text_encoder_from_state_dict(tiny_t5_state_dict(), dtype=torch.float32)
    tokenizer = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    calls = []
    hook = encoder.model.register_forward_pre_hook(lambda m, args: calls.append(1))
    known, parts = {}, {}
    negative = "low quality, blurry"
    first = encode_timed(encoder, tokenizer, [negative], 16, parts, known)[0]
    for i in range(KEEP_CONTEXTS + 2):
        encode_timed(encoder, tokenizer, [f"a cat {i}"], 16, parts, known)
        again = encode_timed(encoder, tokenizer, [negative], 16, parts, known)[0]
        assert again is first
    hook.remove()
    assert len(calls) == 1 + KEEP_CONTEXTS + 2  # the negative prompt once, each new prompt once
    assert len(known) == KEEP_CONTEXTS and (negative, 16) in known
    fresh = encoder.encode([negative], tokenizer, 16)[0]
    assert torch.equal(fresh, first)
    assert parts["encode"] > 0
