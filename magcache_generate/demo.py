"""`--demo`: a tiny random-weight checkpoint in the official layout, built once and cached.

It exercises the real path end to end (loaders, tokenizer, T5, DiT experts, VAE, mp4) in seconds.
The video is noise-like: the weights are random.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = 1
# Small enough for seconds on a CPU; the sizes are the smallest each task supports.
DEMO_OVERRIDES = {"frame_num": 5, "sample_steps": 8}
DEMO_SIZES = {"t2v-A14B": "832*480", "i2v-A14B": "832*480", "ti2v-5B": "1280*704"}


def cache_root() -> Path:
    base = os.environ.get("MAGCACHE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "magcache-generate"


def demo_checkpoint(task: str) -> Path:
    """The cached demo checkpoint folder for `task`, built on first use (atomically)."""
    target = cache_root() / f"demo-v{DEMO_VERSION}" / task
    if target.is_dir():
        return target
    from wan.testing.checkpoint import write_tiny_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}.partial-", dir=target.parent))
    try:
        write_tiny_checkpoint(tmp, task, seed=2025)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
