"""Speed of the DiT forward at real widths: FLOPs, TFLOP/s and the fraction of this device's matmul rate,
for each attention backend available (random weights).

    python benchmarks/bench_transformer.py --small                     # CPU dry run (tiny widths)
    python benchmarks/bench_transformer.py --device cuda               # A14B width, 832x480x81, 2 blocks, bf16
    python benchmarks/bench_transformer.py --device cuda --size 1280x720x81 --attention cudnn,fa3 --compile
    python benchmarks/bench_transformer.py --device cuda --preset ti2v-5B --size 1280x704x121 --json
    python benchmarks/bench_transformer.py --device cuda --attention auto --cfg-batch  # batch-2 CFG vs 2 calls
    python benchmarks/bench_transformer.py --device cuda --attention auto --quantize fp8  # fp8 block Linears

Per attention backend it times the forward with the blocks (median of --repeat) and without them
(embeddings and head), so per block = (forward - fixed) / layers, and extrapolates to the full depth.
The matmul rate is measured on the same device first (a bf16 8192^3 matmul on CUDA). FLOPs count
multiply-adds of the Linears and attention as 2 (the usual convention), element-wise work as 0.
CUDA timings use CUDA events, synchronised once per measurement.

`--cfg-batch` also times, at the same shape and with the blocks, a CFG step's two forwards both ways:
two batch-1 forwards (cond, uncond) against one batch-2 forward (the branches stacked, `wan.cfg_batch`),
with the peak allocated memory of each and the largest difference between their outputs. This is the
measurement `--cfg-batch auto` defers to (resident blocks: no streamed copies to halve here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from wan.attention_backends import BACKENDS, backend_problem
from wan.cfg_batch import repeat_batch, split_branches, stack_contexts
from wan.fp8 import scaled_mm_capable
from wan.modules.attention import AttentionPolicy
from wan.modules.compile import BlockCompiler
from wan.modules.fp8_linear import quantize_model
from wan.modules.transformer import TransformerConfig, WanTransformer
from wan.testing.dit import IN_OUT, tiny_transformer_config


@dataclass(frozen=True)
class Preset:
    dim: int
    heads: int
    ffn: int
    model_type: str
    depth: int  # full depth, for the extrapolation
    vae_stride: tuple[int, int, int]


PRESETS = {
    "A14B": Preset(5120, 40, 13824, "t2v", 40, (4, 8, 8)),
    "ti2v-5B": Preset(3072, 24, 14336, "ti2v", 30, (4, 16, 16)),
    "small": Preset(64, 2, 128, "t2v", 4, (4, 8, 8)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def preset_config(preset: Preset, layers: int, text_len: int, text_dim: int) -> TransformerConfig:
    """The DiT config of a preset's width at `layers` blocks."""
    return tiny_transformer_config(
        preset.model_type,
        dim=preset.dim,
        ffn_dim=preset.ffn,
        num_heads=preset.heads,
        num_layers=layers,
        text_len=text_len,
        text_dim=text_dim,
    )


def latent_shape(size: str, stride: tuple[int, int, int]) -> tuple[int, int, int]:
    """'832x480x81' (width x height x frames) -> latent (frames, height, width)."""
    w, h, f = (int(v) for v in size.lower().split("x"))
    return (f - 1) // stride[0] + 1, h // stride[1], w // stride[2]


def block_flops(tokens: int, dim: int, ffn: int, text_len: int) -> int:
    """Multiply-adds x 2 of one block: q,k,v,o and cross q,o over the tokens, cross k,v over the text,
    the two attention matmuls (self: L x L, cross: L x text_len) and the FFN."""
    linears = 2 * tokens * dim * dim * 6 + 2 * text_len * dim * dim * 2 + 2 * tokens * dim * ffn * 2
    attention = 4 * tokens * tokens * dim + 4 * tokens * text_len * dim
    return linears + attention


def fixed_flops(cfg: TransformerConfig, tokens: int) -> int:
    patch = 2 * tokens * cfg.dim * cfg.in_dim * 4
    text = 2 * cfg.text_len * (cfg.text_dim * cfg.dim + cfg.dim * cfg.dim)
    head = 2 * tokens * cfg.dim * cfg.out_dim * 4
    return patch + text + head


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def median(self, fn: Callable[[], object], warmup: int, repeat: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                start_s = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start_s)
        return statistics.median(times)


def sig(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, timer: Timer) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` on `device` (the reference rate)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timer.median(lambda: a @ b, warmup=3, repeat=10)
    return 2 * n**3 / seconds


def build(cfg: TransformerConfig, dtype: torch.dtype, device: torch.device) -> WanTransformer:
    with torch.device(device):
        model = WanTransformer(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def cfg_batch_timing(
    model: WanTransformer,
    x: torch.Tensor,
    t: torch.Tensor,
    ctx: torch.Tensor,
    timer: Timer,
    args: argparse.Namespace,
) -> dict:
    """One CFG step's forwards: two batch-1 calls vs one batch-2 call (same inputs, blocks included)."""
    if len(model.blocks) == 0:
        raise ValueError("cfg_batch_timing needs the model's blocks: it times whole CFG steps")
    device = x.device
    ctx_null = torch.randn(ctx.shape, device=device, dtype=ctx.dtype)
    x2, t2, ctx2 = repeat_batch(x, 2), repeat_batch(t, 2), stack_contexts([ctx, ctx_null])

    def peak_of(fn: Callable[[], object]) -> float | None:
        if device.type != "cuda":
            return None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    def separate() -> tuple[torch.Tensor, torch.Tensor]:
        return model(x, t, ctx), model(x, t, ctx_null)

    def batched() -> torch.Tensor:
        return model(x2, t2, ctx2)

    two_s = timer.median(separate, args.warmup, args.repeat)
    one_s = timer.median(batched, args.warmup, args.repeat)
    cond, uncond = separate()
    b_cond, b_uncond = split_branches(batched(), 2)
    diff = max((b_cond - cond).abs().max().item(), (b_uncond - uncond).abs().max().item())
    scale = max(cond.abs().max().item(), uncond.abs().max().item())
    return {
        "two_forwards_s": sig(two_s, 4),
        "batched_forward_s": sig(one_s, 4),
        "batched_speedup": round(two_s / one_s, 3),
        "two_forwards_peak_gib": peak_of(separate),
        "batched_peak_gib": peak_of(batched),
        "max_abs_diff": sig(diff),
        "max_abs_output": sig(scale),
    }


def available_backends(device: torch.device, requested: str) -> list[str]:
    names = BACKENDS if requested == "all" else tuple(requested.split(","))
    return [n for n in names if backend_problem(n, device.type) is None]


def run(args: argparse.Namespace) -> dict:
    preset = PRESETS[args.preset]
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    timer = Timer(device)
    in_dim = IN_OUT[preset.model_type][0]
    latent = latent_shape(args.size, preset.vae_stride)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    cfg = preset_config(preset, args.layers, args.text_len, args.text_dim)
    rate = matmul_rate(device, dtype, args.matmul_size, timer)
    model = build(cfg, dtype, device)
    fp8_matmul = args.quantize == "fp8" and args.fp8_matmul != "off" and scaled_mm_capable(device)
    if args.quantize == "fp8":  # the block Linears in fp8, as --quantize fp8 loads them
        if args.fp8_matmul == "on" and not fp8_matmul:
            raise SystemExit("error: --fp8-matmul on needs a CUDA GPU with compute capability >= 8.9")
        quantize_model(model, compute_dtype=dtype, use_scaled_mm=fp8_matmul)
    model.activation_chunk = args.chunk
    x = torch.randn(1, 16 if preset.model_type == "i2v" else in_dim, *latent, device=device)
    ctx = torch.randn(1, args.text_len, args.text_dim, device=device, dtype=dtype)
    t = torch.tensor([900], device=device)
    blocks, no_blocks = model.blocks, nn.ModuleList()
    per_block_flops = block_flops(tokens, cfg.dim, cfg.ffn_dim, cfg.text_len)
    head = cfg.num_heads
    q = torch.randn(1, tokens, head, cfg.head_dim, device=device, dtype=dtype)
    rows = []
    for name in available_backends(device, args.attention):
        policy = AttentionPolicy(name)
        model.attention = policy
        model.block_runner = BlockCompiler() if args.compile else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            try:
                model.blocks = blocks
                forward = timer.median(lambda: model(x, t, ctx), args.warmup, args.repeat)
                model.blocks = no_blocks
                fixed = timer.median(lambda: model(x, t, ctx), 1, args.repeat)
                attention = timer.median(lambda p=policy: p(q, q, q, "bench"), 1, args.repeat)
                model.blocks = blocks  # the CFG timing is of whole forwards (it once ran without blocks)
                cfg_batch = cfg_batch_timing(model, x, t, ctx, timer, args) if args.cfg_batch else None
            except RuntimeError as err:  # a backend that cannot take these inputs
                rows.append({"attention": name, "error": str(err).splitlines()[0][:200]})
                continue
            finally:
                model.blocks = blocks
        per_block = (forward - fixed) / args.layers
        attention_flops = 4 * tokens * tokens * cfg.dim
        full = fixed + per_block * preset.depth
        rows.append(
            {
                "attention": name,
                "ran": policy.describe(),
                "forward_s": round(forward, 4),
                "fixed_s": round(fixed, 4),
                "per_block_s": sig(per_block, 4),
                "block_tflops": sig(per_block_flops / per_block / 1e12),
                "block_fraction_of_matmul": round(per_block_flops / per_block / rate, 3),
                "attention_s": round(attention, 4),
                "attention_tflops": sig(attention_flops / attention / 1e12),
                "attention_fraction_of_matmul": round(attention_flops / attention / rate, 3),
                "full_depth_forward_s": round(full, 3),
                "full_depth_tflops": sig(
                    (per_block_flops * preset.depth + fixed_flops(cfg, tokens)) / full / 1e12
                ),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if device.type == "cuda"
                else None,
                "compile_s": round(model.block_runner.compile_seconds, 1) if args.compile else None,
                "cfg_batch": cfg_batch,
            }
        )
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "size": args.size,
        "tokens": tokens,
        "layers_run": args.layers,
        "full_depth": preset.depth,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "fp8_matmul": fp8_matmul,
        "activation_chunk": model.activation_chunk,
        "compile": args.compile,
        "matmul": {"size": args.matmul_size, "dtype": args.dtype, "tflops": sig(rate / 1e12)},
        "block_flops": per_block_flops,
        "results": rows,
    }


def print_table(result: dict) -> None:
    print(
        f"{result['device']}, torch {result['torch']}: {result['preset']} {result['size']} "
        f"({result['tokens']} tokens), {result['layers_run']} blocks run, {result['dtype']}, "
        f"chunk {result['activation_chunk']}, compile {result['compile']}"
        + (f", {result['quantize']} (fp8 matmul {result['fp8_matmul']})" if result["quantize"] else "")
    )
    print(f"matmul {result['matmul']['size']}^3 {result['dtype']}: {result['matmul']['tflops']} TFLOP/s")
    print(f"FLOP per block: {result['block_flops'] / 1e12:.2f} T")
    depth = f"{result['full_depth']}-block s"
    print(
        f"{'attention':<10} {'ran':<22} {'s/block':>8} {'TFLOP/s':>8} {'of mm':>6} {'attn TF/s':>9} "
        f"{'attn of mm':>10} {depth:>12}"
    )
    for r in result["results"]:
        if "error" in r:
            print(f"{r['attention']:<10} error: {r['error']}")
            continue
        print(
            f"{r['attention']:<10} {r['ran']:<22} {r['per_block_s']:>8.4f} {r['block_tflops']:>8.3g} "
            f"{r['block_fraction_of_matmul']:>6.2f} {r['attention_tflops']:>9.3g} "
            f"{r['attention_fraction_of_matmul']:>10.2f} {r['full_depth_forward_s']:>12.3f}"
        )
    batched = [r for r in result["results"] if r.get("cfg_batch")]
    if batched:
        print(f"CFG step, {result['layers_run']} blocks (measured, not extrapolated):")
        print(
            f"{'attention':<10} {'2 x batch-1 s':>13} {'batch-2 s':>10} {'speedup':>8} {'peak GiB 2x1':>12} "
            f"{'peak GiB 1x2':>12} {'max |diff|':>10}"
        )
    for r in batched:
        c = r["cfg_batch"]
        peaks = [
            f"{p:>12.2f}" if p is not None else f"{'-':>12}"
            for p in (c["two_forwards_peak_gib"], c["batched_peak_gib"])
        ]
        print(
            f"{r['attention']:<10} {c['two_forwards_s']:>13.4g} {c['batched_forward_s']:>10.4g} "
            f"{c['batched_speedup']:>8.3f} {peaks[0]} {peaks[1]} {c['max_abs_diff']:>10.3g}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS, default="A14B")
    parser.add_argument("--size", default="832x480x81", help="W x H x frames")
    parser.add_argument(
        "--layers", type=int, default=2, help="blocks to run (per-block time is extrapolated)"
    )
    parser.add_argument("--attention", default="all", help="comma list of backends, or all (those available)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk", type=int, default=None, help="activation_chunk (tokens)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    parser.add_argument("--quantize", choices=("fp8",), default=None, help="fp8 block Linears")
    parser.add_argument("--fp8-matmul", choices=("auto", "on", "off"), default="auto")
    parser.add_argument(
        "--cfg-batch", action="store_true", help="also time a CFG step: two batch-1 forwards vs one batch-2"
    )
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--matmul-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="CPU dry run: tiny widths and size, fp32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.preset, args.size, args.dtype, args.matmul_size = "small", "64x64x9", "fp32", 512
        args.text_len, args.text_dim, args.repeat, args.warmup = 16, 32, 3, 1
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
