"""Several gloo processes on the CPU for tests of the parallel paths (no torchrun needed).

`spawn_ranks(fn, world, *args)` starts `world` processes that join one gloo process group (a file
rendezvous in a temporary folder) and run `fn(rank, world, *args)`; it returns each rank's return
value, in rank order. `fn` must be importable by name (a module-level function).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

TEST_TIMEOUT = timedelta(seconds=120)  # a rank that waits longer on a collective raises


def _entry(rank: int, world: int, init_file: str, results: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TEST_TIMEOUT
    )
    try:
        value = fn(rank, world, *args)
        torch.save(value, Path(results) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Run `fn(rank, world, *args)` on `world` gloo ranks; their return values in rank order."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "rendezvous")
        mp.spawn(_entry, args=(world, init_file, tmp, fn, args), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(world)]
