"""Complete CLI runs on tiny random checkpoints: outputs, no overwrite, interruption, batch, MagCache."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import imageio
import numpy as np
import pytest
from cli_runs import SMALL_A14B, frames, run_cli

from magcache_generate.magcache.calibration import average
from magcache_generate.magcache.ratios import load_ratios_file
from wan.testing.checkpoint import write_tiny_checkpoint

# One frame: the tests below check what a run writes and reports, not the temporal path (the
# console-script test runs a 5-frame clip; tests/test_vae.py and the goldens check the frames in time).
BASE = ["--size", "832*480", "--frame-num", "1", "--sample-steps", "4", "--base-seed", "7", "--device", "cpu"]


@pytest.fixture(scope="module")
def t2v_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-A14B", "t2v-A14B", seed=3)


def test_console_script_writes_video_frames_and_sidecar(t2v_ckpt, tmp_path):
    script = Path(sys.executable).parent / "magcache-generate"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "magcache_generate"]
    out = tmp_path / "clip.mp4"
    argv = ["--ckpt_dir", str(t2v_ckpt), "--offload_model", "True", "--save-file", str(out)]
    argv += ["--save-frames", str(tmp_path / "frames"), *BASE, "--frame-num", "5"]
    proc = subprocess.run(cmd + argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reader = imageio.get_reader(out)
    meta = reader.get_meta_data()
    decoded = [f for f in reader]
    reader.close()
    assert len(decoded) == 5 and decoded[0].shape == (480, 832, 3) and meta["fps"] == 16
    pngs = frames(tmp_path / "frames")
    assert pngs.shape == (5, 480, 832, 3) and pngs.dtype == np.uint8
    assert (
        np.abs(np.stack(decoded).astype(int) - pngs.astype(int)).mean() < 8
    )  # lossy h264 of the same frames
    sidecar = json.loads((tmp_path / "clip.json").read_text())
    assert sidecar["seed"] == 7 and sidecar["request"]["sample_steps"] == 4
    assert {"encode_text", "denoise", "decode", "write"} <= set(sidecar["timings_s"])
    assert sidecar["peak_memory"]["host_rss_gib"] > 0 and "torch" in sidecar["versions"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_existing_output_is_never_overwritten(t2v_ckpt, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"precious")
    code = run_cli(["--ckpt-dir", str(t2v_ckpt), "--save-file", str(out), *BASE])
    assert code == 2 and out.read_bytes() == b"precious"
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_interrupted_run_leaves_nothing(t2v_ckpt, tmp_path, monkeypatch, capsys):
    import wan.sampling

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wan.sampling, "step", interrupt)
    code = run_cli(["--ckpt-dir", str(t2v_ckpt), "--save-file", str(tmp_path / "clip.mp4"), *BASE])
    assert code == 130
    assert list(tmp_path.iterdir()) == []


def test_batch_with_one_failing_item(t2v_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    items = [
        {"prompt": "a red ball", "save_file": str(tmp_path / "a.mp4")},
        {"prompt": "no such size", "size": "1*1", "save_file": str(tmp_path / "bad.mp4")},
        {"prompt": "a blue ball", "seed": 11, "save_file": str(tmp_path / "b.mp4")},
    ]
    prompts.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    argv = ["--ckpt-dir", str(t2v_ckpt), "--prompt-file", str(prompts)]
    code = run_cli(argv + BASE)
    captured = capsys.readouterr()
    assert code == 3, captured.err  # generated what it could; says not everything was
    assert (tmp_path / "a.mp4").is_file() and (tmp_path / "b.mp4").is_file()
    assert not (tmp_path / "bad.mp4").exists()
    assert "line 2" in captured.err
    assert json.loads((tmp_path / "b.json").read_text())["seed"] == 11
    lines = captured.out.splitlines()
    table = lines[lines.index("batch") + 2 : lines.index("batch") + 5]
    assert [row.split()[:3] for row in table] == [
        ["001", "1", "ok"],
        ["002", "2", "skipped"],
        ["003", "3", "ok"],
    ]
    assert table[0].endswith(str(tmp_path / "a.mp4")) and table[2].endswith(str(tmp_path / "b.mp4"))
    assert "batch: 3 item(s), 2 ok, 1 skipped, 0 failed; total" in captured.out


def test_piped_output_reads_well(t2v_ckpt, tmp_path, capsys):
    """Not a terminal: whole lines of at most 100 columns, paths unbroken, every warning once, one
    speedup figure everywhere."""
    out = tmp_path / ("a_long_folder_name_" * 6) / "clip_with_a_long_name.mp4"
    argv = ["--ckpt-dir", str(t2v_ckpt), "--save-file", str(out), "--use-magcache", *BASE]
    assert run_cli(argv) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert f"video:   {out}" in lines and f"sidecar: {out.with_suffix('.json')}" in lines
    assert any(line.startswith("total:   ") and line.endswith(" s") for line in lines)
    assert "t2v-A14B  seed 7" in lines
    warnings = [line for line in lines if "warning" in line.lower()]
    assert len(warnings) == len(set(warnings))  # each warning once (an aligned 4-step plan has none)
    assert all(len(line) <= 100 for line in lines if "/" not in line)  # only a path may run longer
    report = json.loads(out.with_suffix(".json").read_text())["magcache"]
    shown = f"{report['ideal_speedup']:.3f}x"
    assert f"ideal speedup {shown}" in stdout  # the plan in the log
    assert f"ideal speedup {shown}, estimated" in stdout  # the summary
    assert not any(ch in stdout for ch in "┏┃━│")


def readme_calibration_commands() -> list[list[str]]:
    """The commands of docs/magcache.md's "Calibrating your own curve" block, continuation lines joined."""
    doc = (Path(__file__).parents[1] / "docs" / "magcache.md").read_text()
    block = doc.split("## Calibrating your own curve", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [
        shlex.split(command, comments=True)
        for command in block.replace("\\\n", " ").splitlines()
        if command.strip()
    ]


def test_readme_calibration_over_a_prompt_file_averages_the_prompts(t2v_ckpt, tmp_path, monkeypatch):
    from magcache_generate.magcache import session

    monkeypatch.chdir(tmp_path)
    recorded = []

    def recording_average(recordings):
        recorded.extend(recordings)
        return average(recordings)

    monkeypatch.setattr(session, "average", recording_average)
    calibrate, plan, _ = readme_calibration_commands()
    assert (
        calibrate[0] == "magcache-generate"
        and "--prompt-file" in calibrate
        and "--magcache-calibrate" in calibrate
    )
    prompts = ["a red ball rolls on the grass", "a white cat on a surfboard"]
    Path(calibrate[calibrate.index("--prompt-file") + 1]).write_text("\n".join(prompts) + "\n")
    ckpt = calibrate[calibrate.index("--ckpt-dir") + 1]
    small = SMALL_A14B
    assert run_cli([arg if arg != ckpt else str(t2v_ckpt) for arg in calibrate[1:]] + small) == 0
    data = json.loads(Path(calibrate[calibrate.index("--magcache-calibrate") + 1]).read_text())
    assert data["provenance"]["prompts"] == prompts and data["steps"] == 3

    assert len(recorded) == 2  # one dense run per prompt, averaged
    for stat in ("gamma", "std", "cos_dis"):
        key = {"gamma": "mag_ratios", "std": "mag_std", "cos_dis": "cos_dis"}[stat]
        runs = [r.interleaved(stat) for r in recorded]
        assert np.allclose(data[key], np.mean(runs, axis=0), atol=1e-5), stat
    assert not np.allclose(*(r.interleaved("gamma") for r in recorded), atol=1e-4)  # two different runs

    plan[plan.index("--sample-steps") + 1] = "3"
    assert run_cli(plan[1:]) == 0  # the documented next step reads the averaged file back


def test_never_skipping_magcache_equals_dense(t2v_ckpt, tmp_path):
    dense = [
        "--ckpt-dir",
        str(t2v_ckpt),
        "--save-file",
        str(tmp_path / "d.mp4"),
        "--save-frames",
        str(tmp_path / "d"),
    ]
    assert run_cli(dense + BASE) == 0
    cached = [
        "--ckpt-dir",
        str(t2v_ckpt),
        "--save-file",
        str(tmp_path / "c.mp4"),
        "--save-frames",
        str(tmp_path / "c"),
    ]
    cached += ["--use-magcache", "--magcache-thresh", "1e-12"]
    assert run_cli(cached + BASE) == 0
    assert np.array_equal(frames(tmp_path / "d"), frames(tmp_path / "c"))
    report = json.loads((tmp_path / "c.json").read_text())["magcache"]
    assert report["forwards"] == report["dense_forwards"] == 8


def test_calibrate_then_plan_and_run_with_the_file(t2v_ckpt, tmp_path, capsys):
    ratios = tmp_path / "ratios.json"
    argv = [
        "--ckpt-dir",
        str(t2v_ckpt),
        "--save-file",
        str(tmp_path / "cal.mp4"),
        "--magcache-calibrate",
        str(ratios),
    ]
    assert run_cli(argv + BASE) == 0
    data = json.loads(ratios.read_text())
    assert data["provenance"]["task"] == "t2v-A14B" and data["provenance"]["steps"] == 4
    assert len(data["mag_ratios"]) == 2 * 4 - 2
    curve = load_ratios_file(ratios)
    assert curve.steps == 4
    capsys.readouterr()
    plan_argv = ["--magcache-plan", "--json", "--sample-steps", "4", "--magcache-ratios", str(ratios)]
    assert run_cli(["--use-magcache", *plan_argv]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["steps"] == 4 and len(plan["calls"]) == 8 and plan["dense_forwards"] == 8
    run = ["--ckpt-dir", str(t2v_ckpt), "--save-file", str(tmp_path / "m.mp4"), "--use-magcache"]
    run += ["--magcache-ratios", str(ratios), "--magcache-thresh", "0.5"]
    assert run_cli(run + BASE) == 0
    report = json.loads((tmp_path / "m.json").read_text())["magcache"]
    assert report["dense_forwards"] == 8 and report["ideal_speedup"] >= 1.0


def test_out_of_memory_is_one_actionable_line(t2v_ckpt, tmp_path, monkeypatch, capsys):
    import torch

    import wan.sampling

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.60 GiB. GPU 0 has ...")

    monkeypatch.setattr(wan.sampling, "step", oom)
    argv = ["--ckpt-dir", str(t2v_ckpt), "--save-file", str(tmp_path / "clip.mp4"), "--convert-model-dtype"]
    assert run_cli(argv + BASE) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory (CUDA out of memory)")
    assert "--t5-cpu --vae-tiled" in err[0] and "--convert-model-dtype" not in err[0]
    assert list(tmp_path.iterdir()) == []
