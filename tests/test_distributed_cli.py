"""`torchrun ... -m magcache_generate` on gloo CPU processes: the parallel runs give the frames and the
MagCache decisions of one process, bad layouts stop every rank before loading with one line, and a
failing rank ends the run (marked `distributed`; each test starts torchrun, tens of seconds on a CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runs import frames, run_cli

pytestmark = pytest.mark.distributed

TESTS = Path(__file__).parent
BASE = ["--demo", "--task", "t2v-A14B", "--prompt", "a cat on a surfboard", "--sample-steps", "6"]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture
def env(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("MAGCACHE_CACHE_DIR", str(demo_cache))  # the in-process runs build the demo here
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(
    ranks: int,
    argv: list[str],
    env: dict[str, str],
    script: str | None = None,
    *,
    console_script: bool = False,
) -> subprocess.CompletedProcess:
    """torchrun on `script`, on the console script (`--no-python magcache-generate`) or on the module."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    if console_script:
        target = ["--no-python", str(Path(sys.executable).parent / "magcache-generate")]
    else:
        target = [script] if script else ["-m", "magcache_generate"]
    # a session of its own, as a terminal's job: a signal meant for torchrun reaches nothing else
    return subprocess.run(
        [*launch, *target, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        start_new_session=True,
    )


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "layout", [["--ulysses_size", "2", "--dit_fsdp", "--t5_fsdp"], ["--cfg-parallel"]], ids=["ulysses", "cfg"]
)
def test_parallel_magcache_run_equals_one_process(tmp_path, env, layout):
    magcache = ["--base-seed", "3", "--use-magcache", "--magcache-thresh", "0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli([*BASE, *magcache, "--save-file", f"{one}.mp4", "--save-frames", str(one)]) == 0
    argv = [*BASE, *magcache, *layout, "--save-file", f"{two}.mp4", "--save-frames", str(two)]
    done = torchrun(2, argv, env)
    assert done.returncode == 0, done.stderr
    assert (frames(one).astype(int) - frames(two).astype(int)).max() <= 1
    single, parallel = (json.loads(Path(f"{p}.json").read_text()) for p in (one, two))
    assert parallel["magcache"]["calls"] == single["magcache"]["calls"]  # same computed/skipped steps
    assert any(c["skipped"] for c in single["magcache"]["calls"])
    record = parallel["parallel"]
    assert (record["world_size"], record["backend"]) == (2, "gloo")
    assert (record["ulysses_size"], record["cfg_parallel"]) == (
        (2, False) if "--ulysses_size" in layout else (1, True)
    )
    assert sorted(record["peak_memory_by_rank"]) == ["0", "1"]
    assert bool(record["dit_fsdp"]) == bool(record["t5_fsdp"]) == ("--dit_fsdp" in layout)
    assert done.stdout.count("total:") == 1  # rank 0 prints, rank 1 is quiet


def test_dit_fsdp_shards_fp8_weights_and_gives_the_frames_of_one_process(tmp_path, env):
    """fp8 Linears carry a scalar scale each, which FSDP cannot split: every rank keeps those whole."""
    fp8 = ["--base-seed", "3", "--quantize", "fp8"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli([*BASE, *fp8, "--save-file", f"{one}.mp4", "--save-frames", str(one)]) == 0
    argv = [
        *BASE,
        *fp8,
        "--ulysses-size",
        "2",
        "--dit-fsdp",
        "--save-file",
        f"{two}.mp4",
        "--save-frames",
        str(two),
    ]
    done = torchrun(2, argv, env)
    assert done.returncode == 0, done.stderr
    assert (frames(one).astype(int) - frames(two).astype(int)).max() <= 1
    assert json.loads(Path(f"{two}.json").read_text())["parallel"]["dit_fsdp"]


def test_verify_under_ulysses_gives_the_single_process_comparison(tmp_path, env):
    verify = ["--base-seed", "3", "--use-magcache", "--magcache-thresh", "0.5", "--magcache-verify"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert run_cli([*BASE, *verify, "--save-file", f"{one}/x.mp4"]) == 0
    done = torchrun(2, [*BASE, *verify, "--ulysses-size", "2", "--save-file", f"{two}/x.mp4"], env)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in two.iterdir()) == ["x.dense.mp4", "x.json", "x.mp4"]  # one writer
    single, parallel = (json.loads((d / "x.json").read_text())["magcache"] for d in (one, two))
    assert parallel["calls"] == single["calls"] and parallel["forwards"] < parallel["dense_forwards"]
    quality = parallel["verify"]["quality_vs_dense"]
    assert quality["psnr_db"]["video"] == pytest.approx(
        single["verify"]["quality_vs_dense"]["psnr_db"]["video"], abs=0.05
    )
    assert parallel["verify"]["measured_speedup"] > 0
    assert done.stdout.count("SSIM mean") == 1  # rank 0 prints the comparison once


def test_calibration_under_ulysses_gives_the_single_process_ratios(tmp_path, env):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert (
        run_cli(
            [*BASE, "--base-seed", "3", "--save-file", f"{tmp_path}/a.mp4", "--magcache-calibrate", str(one)]
        )
        == 0
    )
    done = torchrun(
        2,
        [
            *BASE,
            "--base-seed",
            "3",
            "--ulysses-size",
            "2",
            "--save-file",
            f"{tmp_path}/b.mp4",
            "--magcache-calibrate",
            str(two),
        ],
        env,
    )
    assert done.returncode == 0, done.stderr
    single, parallel = (json.loads(p.read_text()) for p in (one, two))
    for key in ("mag_ratios", "mag_std", "cos_dis"):
        assert parallel[key] == pytest.approx(single[key], abs=2e-5), key


def test_bad_layout_stops_every_rank_with_one_line(tmp_path, env):
    done = torchrun(2, [*BASE, "--ulysses-size", "3", "--save-file", f"{tmp_path}/x.mp4"], env)
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert lines == ["error: --ulysses-size 3 does not divide the world size 2; use one of [1, 2]"]
    assert "exitcode: 2" in done.stderr
    assert not list(tmp_path.iterdir())


def test_a_failing_rank_ends_the_run_and_is_named(tmp_path, env):
    out = tmp_path / "x.mp4"
    done = torchrun(
        2, [*BASE, "--ulysses-size", "2", "--save-file", str(out)], env, str(TESTS / "rank_failure.py")
    )
    assert done.returncode != 0
    lines = error_lines(done.stderr)
    assert "error: rank 1 of 2 failed: RuntimeError: injected failure" in lines
    # rank 0 only lost its peer: it points to the cause instead of printing gloo's message as its own
    assert [line for line in lines if "rank 0" in line] in (
        [],
        ["error: rank 0 of 2 stopped: another rank ended the run first (its error says why)"],
    )
    assert not list(tmp_path.iterdir())  # nothing written, nothing half-written


def test_ctrl_c_ends_every_rank_and_writes_nothing(tmp_path, env):
    out, exits = tmp_path / "out", tmp_path / "exits"
    exits.mkdir()
    argv = [*BASE, "--ulysses-size", "2", "--save-file", str(out / "x.mp4"), "--save-frames", str(out)]
    done = torchrun(2, argv, {**env, "RANK_EXIT_DIR": str(exits)}, str(TESTS / "rank_interrupt.py"))
    assert done.returncode != 0
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"0": "130", "1": "130"}  # both ended by us
    assert error_lines(done.stderr) == ["error: interrupted"]  # said once, by rank 0
    assert not out.exists()


def test_the_console_script_runs_under_torchrun_no_python(tmp_path, env):
    argv = [*BASE, "--ulysses-size", "2", "--save-file", str(tmp_path / "x.mp4")]
    done = torchrun(2, argv, env, console_script=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "x.json").read_text())["parallel"]
    assert (record["world_size"], record["ulysses_size"]) == (2, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.mp4"]


def test_prompt_file_replicas_take_each_item_once(tmp_path, env):
    items = [
        {"prompt": "a dog", "seed": 5, "save_file": str(tmp_path / "a.mp4")},
        {"prompt": "a cat on a surfboard", "seed": 3, "save_file": str(tmp_path / "b.mp4")},
        {"prompt": "a bird", "save_file": str(tmp_path / "c.mp4")},  # random seed: drawn once
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(i) + "\n" for i in items))
    argv = [a for a in BASE if a not in ("--prompt", "a cat on a surfboard")]
    done = torchrun(2, [*argv, "--prompt-file", str(prompts)], env)
    assert done.returncode == 0, done.stderr
    sidecars = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "abc"]
    assert [s["parallel"]["replica"] for s in sidecars] == [0, 1, 0]  # round robin over 2 replicas
    assert [s["seed"] for s in sidecars[:2]] == [5, 3]
    assert done.stdout.count("batch: 3 item(s), 3 ok") == 1
    assert done.stdout.count(f"seed {sidecars[2]['seed']} (random") == 1


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL needs 2 GPUs (it refuses two ranks on one)",
)
def test_nccl_ulysses_run_matches_one_gpu(tmp_path, env):
    common = [*BASE, "--base-seed", "3", "--device", "cuda", "--convert-model-dtype"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli([*common, "--save-file", f"{one}.mp4", "--save-frames", str(one)]) == 0
    argv = [*common, "--ulysses-size", "2", "--save-file", f"{two}.mp4", "--save-frames", str(two)]
    done = torchrun(2, argv, env)
    assert done.returncode == 0, done.stderr
    assert json.loads(Path(f"{two}.json").read_text())["parallel"]["backend"] == "nccl"
    # bf16 on GPUs: the sharded attention and GEMMs round differently, so frames agree closely, not exactly
    assert abs(frames(one).astype(float) - frames(two).astype(float)).mean() < 2.0
