"""`magcache-generate compare A B [--json]`: videos and PNG frame folders, errors, dispatch from cli.main."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from magcache_generate import cli
from magcache_generate.compare import compare_files, read_frames
from magcache_generate.quality import video_quality
from magcache_generate.video_io import write_frames_png, write_mp4


def video(seed: int, frames: int = 3, height: int = 32, width: int = 48) -> np.ndarray:
    """Blocks of 8x8 pixels of one colour (so yuv420p's half-resolution chroma keeps them), plus grey noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(30, 226, (frames, height // 8, width // 8, 3))
    base = np.kron(blocks, np.ones((1, 8, 8, 1), dtype=int))
    return np.clip(base + rng.integers(-8, 9, (frames, height, width, 1)), 0, 255).astype(np.uint8)


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


@pytest.fixture
def files(tmp_path):
    a, b = video(1), video(2)
    write_mp4(a, tmp_path / "a.mp4", fps=16)
    write_mp4(b, tmp_path / "b.mp4", fps=16)
    write_frames_png(a, tmp_path / "a_frames")
    write_frames_png(b, tmp_path / "b_frames")
    return tmp_path, a, b


def test_png_folder_reads_back_exactly_and_video_decodes(files):
    folder, a, _ = files
    assert np.array_equal(read_frames(folder / "a_frames"), a)
    decoded = read_frames(folder / "a.mp4")
    assert decoded.shape == a.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - a.astype(int)).mean() < 8  # lossy H.264 of the same frames


def test_json_output_equals_the_quality_of_the_decoded_files(files, capsys):
    folder, _, _ = files
    assert run(["compare", str(folder / "a.mp4"), str(folder / "b.mp4"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = video_quality(read_frames(folder / "a.mp4"), read_frames(folder / "b.mp4")).to_json()
    assert data == {"reference": str(folder / "a.mp4"), "candidate": str(folder / "b.mp4"), **expected}
    assert data["frames"] == 3 and len(data["ssim"]["per_frame"]) == 3


def test_text_output_and_frames_folder_against_video(files, capsys):
    folder, a, b = files
    assert run(["compare", str(folder / "a_frames"), str(folder / "b_frames")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{folder / 'b_frames'} vs {folder / 'a_frames'}: 3 frames, 48x32"
    q = video_quality(a, b)
    assert out[1].startswith(f"PSNR {q.video_psnr_db:.2f} dB, worst frame {q.psnr_db.worst_frame} ")
    # a frames folder and a video mix
    assert run(["compare", str(folder / "a_frames"), str(folder / "a.mp4")]) == 0
    assert "SSIM mean" in capsys.readouterr().out


def test_identical_files(files, capsys):
    folder, _, _ = files
    assert run(["compare", str(folder / "a.mp4"), str(folder / "a.mp4"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["psnr_db"]["video"] is None and data["ssim"]["mean"] == 1.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: [d / "missing.mp4", d / "a.mp4"], "missing.mp4' not found; give a video file or a folder"),
        (lambda d: [d / "a.mp4", d / "empty"], "holds no .png frames"),
        (lambda d: [d / "a.mp4", d / "notes.mp4"], "notes.mp4' is not a readable video"),
        (lambda d: [d / "a.mp4", d / "long.mp4"], "a.mp4' has 3 frames but "),
        (lambda d: [d / "a.mp4", d / "wide.mp4"], "a.mp4' is 48x32 but "),
        (lambda d: [d / "a.mp4"], "Missing argument"),
    ],
)
def test_errors_are_one_line_exit_2(files, capsys, make, message):
    folder, _, _ = files
    (folder / "empty").mkdir()
    (folder / "notes.mp4").write_text("not a video")
    write_mp4(video(3, frames=5), folder / "long.mp4", fps=16)
    write_mp4(video(4, width=64), folder / "wide.mp4", fps=16)
    assert run(["compare", *map(str, make(folder))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_compare_files_is_what_the_command_uses(files):
    folder, _, _ = files
    q = compare_files(folder / "a.mp4", folder / "b_frames")
    assert q.frames == 3 and (q.width, q.height) == (48, 32)


def test_console_script_dispatch_keeps_the_generate_command(files):
    folder, _, _ = files
    script = Path(sys.executable).parent / "magcache-generate"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "magcache_generate"]
    proc = subprocess.run(
        [*cmd, "compare", str(folder / "a.mp4"), str(folder / "b.mp4"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["frames"] == 3
    # the generate command still parses its own options (and upstream spellings) when not given 'compare'
    proc = subprocess.run(
        [*cmd, "--task", "t2v-A14B", "--magcache_plan", "--use_magcache", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["task"] == "t2v-A14B", proc.stderr
