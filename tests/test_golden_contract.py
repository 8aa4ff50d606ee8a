"""A missing or empty golden set FAILS the golden and end-to-end tests; it never passes by skipping them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Every test that reads a golden set, as the case a missing set must fail.
GOLDEN_CONSUMERS = (
    "test_transformer_golden.py::test_dit_matches_official[MISSING-dit]",
    "test_pipeline_golden.py::test_pipeline_matches_official[MISSING-pipe]",
    "test_magcache_golden.py::test_magcache_official_matches_script[MISSING-magcache]",
    "test_e2e.py::test_cli_reproduces_official_frames[MISSING-e2e]",
    "test_video_io.py::test_uint8_matches_official_frames[MISSING-e2e]",
)


def run_golden_tests(golden_dir: Path, e2e_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAGCACHE_GOLDEN_DIR": str(golden_dir), "MAGCACHE_E2E_DIR": str(e2e_dir)}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "golden",
        "-rfEs",
        # only the consumers' files: collecting the whole suite would cost more than running them
        *sorted({f"tests/{case.partition('::')[0]}" for case in GOLDEN_CONSUMERS}),
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("layout", ["absent", "empty folder", "empty manifest"])
def test_golden_tests_fail_without_a_golden_set(tmp_path, layout):
    folder = tmp_path / "golden"
    if layout != "absent":
        folder.mkdir()
    if layout == "empty manifest":
        (folder / "manifest.json").write_text(json.dumps({"goldens": {}, "cases": {}}))
    proc = run_golden_tests(folder, folder)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "skipped" not in summary and "passed" not in summary, summary
    # one failing case per golden consumer, each naming the folder and what is missing
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    for test in GOLDEN_CONSUMERS:
        assert any(test in line for line in failed), (test, failed)
    assert f"MAGCACHE_GOLDEN_DIR={folder}" in proc.stdout and f"MAGCACHE_E2E_DIR={folder}" in proc.stdout
