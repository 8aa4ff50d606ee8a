"""End to end: the installed `magcache-generate` console script on complete checkpoint folders gives
the frames the official generate.py (and MagCache4Wan2.2 script) produced from them.

The golden-e2e set (default tests/golden_e2e, or $MAGCACHE_E2E_DIR) holds tiny random checkpoints in
the official layout and the official uint8 frames (every 8th row pair). Each case runs the CLI with the
exact argv of its manifest entry and compares our `--save-frames` PNGs on the stored rows.
Tolerance: mean abs difference <= 0.3 levels and max <= 8 (measured: mean ~2e-5, max 1).
A missing or empty set fails (one MISSING-e2e case), it does not skip.
"""

import json
import os
import subprocess
from functools import cache
from pathlib import Path

import pytest
from goldens import assert_frames_match, installed_cli, missing_param, set_problem
from safetensors.torch import load_file

E2E_DIR = Path(os.environ.get("MAGCACHE_E2E_DIR", Path(__file__).parent / "golden_e2e"))


@cache
def manifest() -> dict:
    path = E2E_DIR / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {"cases": {}}


CASES = [
    pytest.param(name, id=name, marks=[pytest.mark.golden, pytest.mark.e2e]) for name in manifest()["cases"]
] or [missing_param("e2e", f"no end-to-end case: {set_problem(E2E_DIR, 'MAGCACHE_E2E_DIR')}")]


@pytest.mark.parametrize("case", CASES)
def test_cli_reproduces_official_frames(case, tmp_path):
    entry = manifest()["cases"][case]
    frames_dir = tmp_path / "frames"
    subs = {"{ckpt_root}": str(E2E_DIR / "ckpt"), "{e2e_dir}": str(E2E_DIR), "{frames_dir}": str(frames_dir)}
    argv = []
    for arg in entry["cli_argv"]:
        for key, value in subs.items():
            arg = arg.replace(key, value)
        argv.append(arg)
    argv += ["--save-file", str(tmp_path / "out.mp4"), "--device", "cpu"]
    proc = subprocess.run(installed_cli() + argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.mp4").is_file() and (tmp_path / "out.json").is_file()

    data = load_file(E2E_DIR / entry["file"])
    assert_frames_match(frames_dir, data, entry["frames"])
