"""One invocation over a torchrun world, once every input has been checked: join the process group,
share rank 0's requests (a random seed is drawn once), give each replica its prompt-file items, run
them, and bring every replica's results to rank 0 for the closing table and the exit code."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from magcache_generate.command import EXIT_FAILURE, print_random_seeds
from magcache_generate.parallel import ParallelOptions, RankFailed, RankRuntime, with_device
from wan.distributed.layout import ParallelLayout

if TYPE_CHECKING:
    from rich.console import Console

    from magcache_generate.batch import Batch
    from magcache_generate.request import Request
    from magcache_generate.startup import StartupClock
    from magcache_generate.weight_paths import WeightPaths
    from wan.configs import TaskConfig


def dit_heads(weights: WeightPaths, cfg: TaskConfig) -> int:
    """The attention heads of the run's DiT (from its config file or a single file's shapes: nothing
    loads)."""
    from wan.loading import read_transformer_config

    path = weights.dits[cfg.high_noise_checkpoint] if cfg.two_experts else weights.dits[""]
    return read_transformer_config(path).num_heads


def run_parallel(
    layout: ParallelLayout,
    options: ParallelOptions,
    requests: list[Request],
    random_seeds: list[bool],
    magcache: list[Any],
    batch: Batch | None,
    *,
    console: Console,
    debug: bool,
    started: float,
    startup: StartupClock | None = None,
) -> int:
    """This rank's part of the run; returns the run's exit code (the same on every rank). `magcache`:
    each request's MagCache plan, checked before loading."""
    from magcache_generate.run import run_requests

    if startup is not None:
        startup.mark("runtime_imported")
    runtime = RankRuntime.start(layout, options, requests[0].device)
    try:
        # rank 0's requests everywhere: its random seeds and its time-stamped file names
        requests = with_device(runtime.share(requests), runtime.device)
        numbers = [e.number for e in batch.entries] if batch is not None else None
        print_random_seeds(console, requests, random_seeds, numbers)
        indices = runtime.item_indices(len(requests)) if batch is not None else [0]
        try:
            results = run_requests(
                [requests[i] for i in indices],
                console=console,
                debug=debug,
                batch=batch is not None,
                magcache=[magcache[i] for i in indices],
                parallel=runtime,
                startup=startup,
            )
        except KeyboardInterrupt:
            raise
        except Exception as err:
            raise RankFailed(runtime.rank, layout.world, err) from err
        results = runtime.gather_results(indices, results, len(requests))
        if batch is None:
            return EXIT_FAILURE if results[0].get("error") else 0
        return _close_batch(batch, requests, results, console, started)
    finally:
        runtime.close()


def _close_batch(
    batch: Batch, requests: list[Request], results: list[dict[str, Any]], console: Console, started: float
) -> int:
    from magcache_generate.batch import batch_exit_code, batch_rows
    from magcache_generate.progress import print_batch

    entries = [dataclasses.replace(e, request=r) for e, r in zip(batch.entries, requests, strict=True)]
    rows = batch_rows(entries, batch.problems, results)
    print_batch(console, rows, time.perf_counter() - started)  # rank 0's console; the others are quiet
    return batch_exit_code(rows)
