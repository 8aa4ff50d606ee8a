"""Seconds per denoising step of one DiT over 1 process against N processes (Ulysses sequence parallel,
CFG parallel), random weights, and the bytes each rank exchanges per step.

    python benchmarks/bench_distributed.py                        # CPU: gloo, 1 vs 2 ranks, small model
    python benchmarks/bench_distributed.py --ranks 2,4 --cfg-parallel --json
    torchrun --nproc-per-node 8 benchmarks/bench_distributed.py --device cuda --preset A14B --size 832x480x81

Without torchrun it spawns the ranks itself on the CPU (gloo, one thread per rank). Under torchrun it
runs the layout torchrun gives it (NCCL on CUDA) and prints rank 0's figures. A step is one CFG step:
the cond and the uncond forward (one each per CFG half with --cfg-parallel). The times are medians of
--repeat steps after one warm-up step.

On the CPU with gloo the figures say that the parallel paths run and what they cost here, not what
they give on GPUs: gloo moves tensors through host memory and TCP, and the ranks share this
machine's cores, so the communication is far slower relative to the compute than NCCL over NVLink.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from wan.modules.transformer import WanTransformer
from wan.testing.dit import random_transformer_state_dict, tiny_transformer_config

# (dim, heads, layers, ffn) of the presets; "small" fits a CPU dry run
PRESETS = {"small": (256, 8, 4, 1024), "ti2v-5B": (3072, 24, 30, 14336), "A14B": (5120, 40, 40, 13824)}


def build_model(preset: str, device: torch.device, dtype: torch.dtype) -> WanTransformer:
    dim, heads, layers, ffn = PRESETS[preset]
    cfg = tiny_transformer_config(dim=dim, num_heads=heads, num_layers=layers, ffn_dim=ffn, text_dim=64)
    model = WanTransformer(cfg)
    if preset == "small":
        model.load_state_dict(random_transformer_state_dict(cfg))
    return model.to(device=device, dtype=dtype).eval()


def latent_shape(size: str) -> tuple[int, int, int]:
    """'WxHxF' (video pixels) -> the latent (frames, height, width) of the t2v VAE (stride 4, 8, 8)."""
    w, h, f = (int(v) for v in size.lower().split("x"))
    return (f - 1) // 4 + 1, h // 8, w // 8


def step_seconds(
    model: WanTransformer,
    shape: tuple[int, int, int],
    device: torch.device,
    repeat: int,
    cfg_half: int | None,
) -> float:
    """Median seconds of one CFG step on this rank (`cfg_half`: this rank's one branch, or None: both)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, 16, *shape, generator=gen).to(device)
    contexts = [torch.randn(1, model.config.text_len, 64, generator=gen).to(device) for _ in range(2)]
    t = torch.tensor([500], device=device)
    branches = [contexts[cfg_half]] if cfg_half is not None else contexts
    times = []
    for i in range(repeat + 1):
        if dist.is_initialized():
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            for context in branches:
                model(x, t, context)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def exchanged_bytes(
    preset: str, shape: tuple[int, int, int], ulysses: int, cfg_parallel: bool, item: int
) -> int:
    """Bytes one rank sends per CFG step. Per forward under Ulysses N: per block 4 all-to-alls (q, k, v,
    the attention output) of its [S, dim] shard, (N-1)/N of each leaving the rank, plus the all-gather of
    its head output (S x 64 float32). A rank runs both forwards of a step, or one with --cfg-parallel,
    which adds one all-gather of the noise prediction (the latent, float32)."""
    dim, _, layers, _ = PRESETS[preset]
    tokens = shape[0] * (shape[1] // 2) * (shape[2] // 2)
    shard = -(-tokens // ulysses)
    forward = 0
    if ulysses > 1:
        forward = layers * 4 * shard * dim * item * (ulysses - 1) // ulysses + shard * 64 * 4 * (ulysses - 1)
    latent = 16 * shape[0] * shape[1] * shape[2] * 4
    return forward + latent if cfg_parallel else 2 * forward


def run_rank(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """This rank's measurement (all ranks of the world form one Ulysses x CFG group)."""
    from wan.distributed.sequence import SequenceParallel

    device = torch.device(args["device"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args["preset"], device, dtype)
    cfg_half = None
    ulysses = world
    if world > 1:
        group = dist.group.WORLD
        if args["cfg_parallel"]:
            ulysses = world // 2
            halves = [dist.new_group(list(range(c * ulysses, (c + 1) * ulysses))) for c in range(2)]
            cfg_half = rank // ulysses
            group = halves[cfg_half]
        if ulysses > 1:
            model.sequence_parallel = SequenceParallel.for_group(group)
    shape = latent_shape(args["size"])
    seconds = step_seconds(model, shape, device, args["repeat"], cfg_half)
    item = 2 if dtype == torch.bfloat16 else 4
    return {
        "ranks": world,
        "ulysses": ulysses,
        "cfg_parallel": cfg_half is not None,
        "s_per_step": round(seconds, 4),
        "sent_mib_per_step": round(
            exchanged_bytes(args["preset"], shape, ulysses, cfg_half is not None, item) / 2**20, 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--size", default="256x256x17", help="video WxHxF (default: a CPU-sized clip)")
    parser.add_argument("--ranks", default="2", help="spawned rank counts to compare with 1 (CPU only)")
    parser.add_argument("--cfg-parallel", action="store_true", help="half the ranks per CFG branch")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    args = vars(ns)
    if "WORLD_SIZE" in os.environ:  # under torchrun: the world it gives
        dist.init_process_group("nccl" if ns.device.startswith("cuda") else "gloo")
        row = run_rank(dist.get_rank(), dist.get_world_size(), args)
        rows = [row] if dist.get_rank() == 0 else []
        dist.destroy_process_group()
    else:
        from wan.testing.distributed import spawn_ranks

        torch.set_num_threads(1)  # each spawned rank runs one thread: compare like with like
        rows = [run_rank(0, 1, args)]
        for n in (int(v) for v in ns.ranks.split(",")):
            rows.append(spawn_ranks(run_rank, n, args)[0])
    if not rows:
        return
    base = rows[0]["s_per_step"] if rows[0]["ranks"] == 1 else None
    for row in rows:
        row["speedup_vs_1"] = round(base / row["s_per_step"], 3) if base else None
    if ns.json:
        print(json.dumps({"device": ns.device, "preset": ns.preset, "size": ns.size, "rows": rows}, indent=1))
        return
    print(f"{ns.preset} model, {ns.size}, {ns.device}")
    for row in rows:
        print(
            f"ranks {row['ranks']} (ulysses {row['ulysses']}, cfg-parallel {row['cfg_parallel']}): "
            f"{row['s_per_step']:.3f} s/step, speedup {row['speedup_vs_1']}, "
            f"sent {row['sent_mib_per_step']} MiB/step per rank"
        )


if __name__ == "__main__":
    main()
