"""Helpers for tests that run the CLI in-process and read what it wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magcache_generate import cli

# A quick A14B run: the smallest size, one frame, the 4-step distilled recipe, a fixed seed.
FAST_A14B = [
    "--size",
    "832*480",
    "--frame-num",
    "1",
    "--base-seed",
    "7",
    "--device",
    "cpu",
    "--distilled",
    "lightning",
]

# one frame, three steps of the task's own recipe: for CLI tests that check what a run does, not its frames
SMALL_A14B = [
    "--size",
    "832*480",
    "--frame-num",
    "1",
    "--sample-steps",
    "3",
    "--base-seed",
    "7",
    "--device",
    "cpu",
]


def run_cli(argv: list[str]) -> int:
    """`magcache-generate argv` in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code


def frames(folder: Path) -> np.ndarray:
    """The `--save-frames` PNGs of a folder as one [T, H, W, 3] uint8 array."""
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))])
