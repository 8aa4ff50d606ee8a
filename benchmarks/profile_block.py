"""Where the time of a DiT forward goes, by kernel: matmuls, attention and the rest (element-wise
work, norms, casts, copies), from torch.profiler over one forward at real width (random weights).

    python benchmarks/profile_block.py --device cuda --size 832x480x81 --layers 2 --json
    python benchmarks/profile_block.py --small             # CPU dry run (tiny widths)

It says what the non-attention part of a block is made of, the part the 70% target must shrink
(`bench_transformer.py` gives the totals). Kernels are grouped by name: `matmul` (cuBLAS/CUTLASS
GEMM kernels), `attention` (cuDNN/flash/efficient SDPA kernels), `other` (everything else). On the
CPU the profiler reports operators, not kernels: the grouping then only shows that the script runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_transformer import DTYPES, IN_OUT, PRESETS, build, latent_shape, preset_config  # a sibling script

from wan.modules.attention import AttentionPolicy
from wan.modules.compile import BlockCompiler

MATMUL_MARKS = ("gemm", "nvjet", "cutlass", "xmma", "addmm", "aten::mm", "aten::bmm", "aten::linear")
ATTENTION_MARKS = ("fmha", "flash", "cudnn", "attention", "sdpa", "efficient")


def group_of(name: str) -> str:
    lowered = name.lower()
    if any(mark in lowered for mark in ATTENTION_MARKS):
        return "attention"
    if any(mark in lowered for mark in MATMUL_MARKS):
        return "matmul"
    return "other"


def run(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    in_dim = IN_OUT[preset.model_type][0]
    latent = latent_shape(args.size, preset.vae_stride)
    cfg = preset_config(preset, args.layers, text_len=512, text_dim=32 if args.small else 4096)
    model = build(cfg, dtype, device)
    model.attention = AttentionPolicy("auto")
    model.block_runner = BlockCompiler() if args.compile else None
    x = torch.randn(1, in_dim, *latent, device=device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    t = torch.tensor([900], device=device)
    cuda = device.type == "cuda"
    with torch.inference_mode():
        for _ in range(2):  # warm-up: cuDNN plans, GEMM heuristics, compilation
            model(x, t, ctx)
        if cuda:
            torch.cuda.synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            model(x, t, ctx)
            if cuda:
                torch.cuda.synchronize(device)
    events = prof.key_averages()
    rows = []
    for event in events:
        us = event.device_time_total if cuda else event.self_cpu_time_total
        if cuda and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if us > 0:
            rows.append({"name": event.key[:120], "ms": round(us / 1000, 3), "calls": event.count})
    rows.sort(key=lambda r: -r["ms"])
    groups: dict[str, float] = {}
    for r in rows:
        groups[group_of(r["name"])] = groups.get(group_of(r["name"]), 0.0) + r["ms"]
    total = sum(groups.values())
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "layers": args.layers,
        "compile": args.compile,
        "total_ms": round(total, 2),
        "groups_ms": {k: round(v, 2) for k, v in sorted(groups.items())},
        "per_block_groups_ms": {k: round(v / args.layers, 2) for k, v in sorted(groups.items())},
        "top": rows[: args.top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="A14B")
    parser.add_argument("--size", default="832x480x81")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--small", action="store_true", help="CPU dry run: tiny widths and size, fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.device, args.preset, args.size, args.dtype = "cpu", "small", "64x64x9", "fp32"
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['device']}: {result['total_ms']} ms in kernels over {result['layers']} blocks + rest")
    print("per block:", result["per_block_groups_ms"])
    for r in result["top"]:
        print(f"  {r['ms']:9.3f} ms  {r['calls']:5d}  {r['name']}")


if __name__ == "__main__":
    main()
