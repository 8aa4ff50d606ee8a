"""`--dit-fsdp` loading: what one rank holds after loading a DiT expert whole and after loading it
sharded over the ranks (each rank allocates and fills only its rows), on gloo CPU processes.

Each rank loads the expert of CKPT_DIR (an official-layout folder, e.g. one written by
`wan.testing.real_width.write_real_width_checkpoint`) twice in a fresh process per mode and reports
the bytes of parameters it holds and its peak anonymous memory (`RssAnon` sampled every 20 ms, the
file-backed pages of the memory map apart), with the load time.

    python benchmarks/bench_fsdp_load.py CKPT_DIR [--ranks 2] [--expert high_noise_model]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_rank(rank: int, world: int, folder: str, sharded: bool) -> dict:
    import torch.distributed as dist

    from magcache_generate.metering import HostPressure, host_memory
    from wan.distributed.fsdp import is_sharded, shard_weights
    from wan.loading import load_transformer

    before = (host_memory() or {}).get("anon", 0)
    meter = HostPressure()
    meter.start()
    start = time.perf_counter()
    shard = (lambda m: shard_weights(m, dist.group.WORLD, "cpu")) if sharded else None
    model = load_transformer(folder, shard=shard)
    seconds = time.perf_counter() - start
    meter.stop()
    held = sum((p.to_local() if is_sharded(p) else p).nbytes for p in model.parameters())
    return {
        "rank": rank,
        "held_gib": held / 2**30,
        "peak_anon_gib": meter.peak_pressure / 2**30,
        "anon_before_gib": before / 2**30,
        "load_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--expert", default="high_noise_model")
    args = parser.parse_args()
    from wan.testing.distributed import spawn_ranks

    folder = str(args.ckpt / args.expert)
    for sharded in (False, True):
        for row in spawn_ranks(load_rank, args.ranks, folder, sharded):
            print(
                json.dumps(
                    {
                        "mode": "sharded" if sharded else "whole",
                        **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
                    }
                )
            )


if __name__ == "__main__":
    main()
