"""The stretch before the first denoising step, with and without loading the first expert while the
text encoder works: text side (transformers imports, tokenizer, umT5 read, two encodes) and the
first expert's load, run one after the other ("sequential") and overlapped ("overlap": the expert
loads on a background thread, `ExpertPool.prefetch`, and is taken with `activate`).

Each mode runs in a fresh process (no warm imports, warm page cache after a first discarded read),
alternating, `--repeats` times; it prints one JSON line per run and the medians.

    python benchmarks/bench_overlap.py CKPT_DIR [--task t2v-A14B] [--repeats 2]

CKPT_DIR: an official-layout folder (e.g. `wan.testing.real_width.write_real_width_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one_run(ckpt: Path, task: str, overlap: bool) -> dict[str, float]:
    import torch

    from magcache_generate.run_plan import expert_paths
    from magcache_generate.text_stage import encode_timed, load_text_side
    from wan.configs import TASKS
    from wan.experts import ExpertPool

    cfg = TASKS[task]
    paths = expert_paths(cfg, ckpt)
    first = next(iter(paths))
    pool = ExpertPool(
        paths, dtype=torch.float32, device=torch.device("cpu"), offload=True, keep_inactive=False
    )
    start = time.perf_counter()
    if overlap:
        pool.prefetch(first)
    parts: dict[str, float] = {}
    encoder, tokenizer = load_text_side(
        ckpt / cfg.t5_checkpoint, ckpt / cfg.t5_tokenizer, device=torch.device("cpu"), parts=parts
    )
    encode_timed(encoder, tokenizer, ["a red ball rolls across the green grass"], 512, parts)
    encode_timed(encoder, tokenizer, [cfg.negative_prompt], 512, parts)
    text_done = time.perf_counter()
    pool.activate(first)
    end = time.perf_counter()
    _, load_start, load_end = pool.loads[0]
    return {
        "mode": "overlap" if overlap else "sequential",
        "to_first_step_s": round(end - start, 3),
        "text_s": round(text_done - start, 3),
        "expert_load_s": round(load_end - load_start, 3),
        "waited_after_text_s": round(end - text_done, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--task", default="t2v-A14B")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["sequential", "overlap"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(args.ckpt, args.task, args.child == "overlap")))
        return
    for path in sorted(args.ckpt.rglob("*")):  # warm the page cache: both modes read from memory
        if path.is_file():
            path.read_bytes()
    rows: dict[str, list[float]] = {"sequential": [], "overlap": []}
    for _ in range(args.repeats):
        for mode in rows:
            argv = [sys.executable, __file__, str(args.ckpt), "--task", args.task, "--child", mode]
            line = (
                subprocess.run(argv, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            print(line, flush=True)
            rows[mode].append(json.loads(line)["to_first_step_s"])
    print(json.dumps({mode: round(statistics.median(v), 3) for mode, v in rows.items()}))


if __name__ == "__main__":
    main()
