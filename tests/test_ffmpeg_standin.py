"""benchmarks/ffmpeg_standin.py (the GPU check's ffmpeg for a machine without one) understands the
command magcache_generate.video_io builds: its arguments are captured from a real write_mp4 call
through a recording executable, then parsed and the frames decoded. OpenCV, its encoder, is not
needed here (it is on the GPU image; checked by hand with opencv-python-headless 5.0)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import ffmpeg_standin

from magcache_generate.video_io import write_mp4


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """write_mp4 through an 'ffmpeg' that records its arguments and stdin and leaves a file."""
    exe = tmp_path / "ffmpeg"
    exe.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > "{tmp_path}/argv"\n'
        f'cat > "{tmp_path}/stdin"\n'
        'for last; do :; done\necho mp4 > "$last"\n'
    )
    exe.chmod(0o755)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(exe))
    frames = np.random.default_rng(0).integers(0, 256, (3, 6, 10, 3), dtype=np.uint8)
    out = write_mp4(frames, tmp_path / "v.mp4", fps=16)
    argv = (tmp_path / "argv").read_text().splitlines()
    return frames, argv, (tmp_path / "stdin").read_bytes(), out


def test_parses_the_writer_command_and_decodes_its_frames(recorded):
    frames, argv, stdin, out = recorded
    width, height, fps, path = ffmpeg_standin.parse(argv)
    assert (width, height, fps) == (10, 6, 16.0)
    assert path.endswith(".mp4") and Path(path).parent == out.parent  # the writer's temp file
    got = []
    assert ffmpeg_standin.encode(io.BytesIO(stdin), width, height, got.append) == 3
    assert np.array_equal(np.stack(got), frames[..., ::-1])  # OpenCV takes BGR


def test_anything_else_is_refused_with_one_line(recorded, capsys):
    _, argv, stdin, _ = recorded
    with pytest.raises(ffmpeg_standin.Unsupported, match="ended inside frame 1"):
        ffmpeg_standin.encode(io.BytesIO(stdin[: 6 * 10 * 3 + 5]), 10, 6, lambda f: None)
    assert ffmpeg_standin.main(["-i", "clip.mp4", "-f", "image2pipe", "-"]) == 1
    assert "only encodes rawvideo rgb24 from stdin" in capsys.readouterr().err
    with pytest.raises(ffmpeg_standin.Unsupported, match=r"only writes \.mp4"):
        ffmpeg_standin.parse([*argv[:-1], "out.webm"])
    assert ffmpeg_standin.main(["-version"]) == 0
