"""One DiT block at real width in fp8 against bf16 and float32: relative error, and on a GPU the speed.

    python benchmarks/fp8_block.py --device cpu --tokens 256 --json          # errors on the CPU
    python benchmarks/fp8_block.py --device cuda --size 832x480x81 --json     # errors and speed, GPU
    python benchmarks/fp8_block.py --small --json                             # CPU dry run, tiny widths

The block has random weights (as `wan.testing.real_width`: unit-ish activations), a random float32
input stream, a random time modulation and a random text context. Variants:

- `fp32`: float32 parameters, float32 compute: the reference;
- `bf16`: the block's parameters in bf16 (`--convert-model-dtype`'s regime);
- `bf16_linears`: the block Linears in bf16, norms and modulation float32 (the default GPU regime,
  float32 parameters under bf16 autocast): the baseline the fp8 speed-ups are given against;
- `fp8_<granularity>_dequant_<dtype>`: the block Linears in fp8 (`wan.fp8`, per-tensor or per-row
  scales), dequantised per layer to `dtype` (float32 as on the CPU, bfloat16 as on a GPU);
- `fp8_<granularity>_scaled_mm` (GPUs with compute capability >= 8.9): the fp8 matmul.

Errors: ||y - y_ref|| / ||y_ref|| of the block's update (output minus input: what the block adds to
the residual stream) and of its output, against fp32; the fp8 variants' update also against
`bf16_linears` (the regime fp8 replaces on a GPU). On CUDA every variant is also timed (median of --repeat
calls, after --warmup), optionally compiled (--compile).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_transformer import PRESETS, latent_shape  # a sibling script

from wan.fp8 import scaled_mm_capable
from wan.modules.attention import AttentionPolicy
from wan.modules.block import Block, BlockRuntime, Modulation
from wan.modules.compile import BlockCompiler
from wan.modules.fp8_linear import BLOCK_LINEARS, quantize_block
from wan.modules.rope import grid_rope
from wan.testing.dit import tiny_transformer_config
from wan.testing.real_width import REAL_DIT, SMALL_DIT


def reference_block(dim: int, heads: int, ffn: int, seed: int) -> Block:
    cfg = tiny_transformer_config("t2v", dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=1)
    block = Block(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            x = torch.randn(p.shape, generator=gen)
            if name == "modulation":
                x *= 0.1
            elif name.endswith(".bias"):
                x *= 0.02
            elif p.dim() == 1:
                x = 1.0 + 0.1 * x
            else:
                x /= p.shape[1] ** 0.5
            p.copy_(x)
    return block.eval().requires_grad_(False)


def grid_for(tokens: int) -> tuple[int, int, int]:
    """A (frames, height, width) token grid with `tokens` tokens (as square as it gets)."""
    frames = 1
    side = int(tokens**0.5)
    while tokens % side:
        side -= 1
    return frames, side, tokens // side


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dim, heads, ffn = SMALL_DIT if args.small else REAL_DIT["t2v"][:3]
    if args.size:
        preset = PRESETS["A14B"]
        f, h, w = latent_shape(args.size, preset.vae_stride)
        grid = (f, h // 2, w // 2)
    else:
        grid = grid_for(args.tokens)
    tokens = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, tokens, dim, generator=gen)
    e0 = 0.1 * torch.randn(1, 1, 6, dim, generator=gen)
    context = torch.randn(1, args.text_len, dim, generator=gen)
    mod = Modulation(e=e0[:, :, 0], e0=e0, index=None)
    head_dim = dim // heads
    base = reference_block(dim, heads, ffn, args.seed)

    variants: dict[str, tuple[Block, torch.dtype]] = {"fp32": (base, torch.float32)}
    variants["bf16"] = (copy.deepcopy(base).to(torch.bfloat16), torch.bfloat16)
    linears_bf16 = copy.deepcopy(base)  # the default GPU regime: bf16 Linears, float32 norms/modulation
    for name in BLOCK_LINEARS:
        linears_bf16.get_submodule(name).to(torch.bfloat16)
    variants["bf16_linears"] = (linears_bf16, torch.bfloat16)
    compute = (torch.float32, torch.bfloat16)  # float32: a CPU run's regime; bfloat16: a GPU run's
    for granularity in ("tensor", "row"):
        for dtype in compute:
            block = copy.deepcopy(base)
            quantize_block(block, compute_dtype=dtype, granularity=granularity)
            variants[f"fp8_{granularity}_dequant_{str(dtype).removeprefix('torch.')}"] = (block, dtype)
        if scaled_mm_capable(device):
            block = copy.deepcopy(base)
            quantize_block(block, compute_dtype=torch.bfloat16, granularity=granularity, use_scaled_mm=True)
            variants[f"fp8_{granularity}_scaled_mm"] = (block, torch.bfloat16)
    if args.only:
        variants = {k: v for k, v in variants.items() if k == "fp32" or k in args.only}

    x_dev, mod_dev = x.to(device), Modulation(e=mod.e.to(device), e0=mod.e0.to(device), index=None)
    rope = grid_rope(head_dim, grid, device)
    runtime = BlockRuntime(rope=rope, attention=AttentionPolicy(args.attention))
    cuda = device.type == "cuda"
    results, reference, bf16_out = {}, None, None
    for name, (block, dtype) in variants.items():
        block = block.to(device)
        ctx = context.to(device=device, dtype=dtype)
        compiler = BlockCompiler() if args.compile and cuda else None

        def call(block=block, ctx=ctx, dtype=dtype, compiler=compiler) -> torch.Tensor:
            if compiler is not None:
                return compiler(block, x_dev.clone(), mod_dev, ctx, runtime)
            return block.compute(x_dev.clone(), mod_dev, ctx, runtime, dtype)

        with torch.inference_mode():
            out = call().float().cpu()
            row: dict = {"weight_bytes": sum(p.numel() * p.element_size() for p in block.parameters())}
            if reference is None:
                reference = out
            else:
                update, ref_update = out - x, reference - x
                row["rel_error_update"] = float((update - ref_update).norm() / ref_update.norm())
                row["rel_error_output"] = float((out - reference).norm() / reference.norm())
            if name == "bf16_linears":
                bf16_out = out
            elif name.startswith("fp8") and bf16_out is not None:  # against the regime it replaces
                bf16_update = bf16_out - x
                row["rel_error_update_vs_bf16_linears"] = float(
                    (out - x - bf16_update).norm() / bf16_update.norm()
                )
            if cuda or args.time_cpu:
                for _ in range(args.warmup):
                    call()
                times = []
                for _ in range(args.repeat):
                    if cuda:
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    call()
                    if cuda:
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - start)
                row["block_s"] = round(sorted(times)[len(times) // 2], 5)
        results[name] = row
        block.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
    baseline = results.get("bf16_linears", {}).get("block_s")
    for name, row in results.items():
        if baseline and name.startswith("fp8") and "block_s" in row:
            row["speedup_vs_bf16_linears"] = round(baseline / row["block_s"], 3)
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "dim": dim,
        "ffn_dim": ffn,
        "heads": heads,
        "tokens": tokens,
        "text_len": args.text_len,
        "compile": bool(args.compile and cuda),
        "variants": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the block input (without --size)")
    parser.add_argument("--size", default=None, help="W x H x frames: the tokens of that A14B video")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile each variant (CUDA)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=[], help="comma list of variants")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--time-cpu", action="store_true", help="also time the variants on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="CPU dry run: tiny widths")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.device, args.size, args.tokens, args.text_len = "cpu", None, 64, 16
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['device']}, torch {result['torch']}: one block, dim {result['dim']}, {result['tokens']} tokens"
    )
    for name, row in result["variants"].items():
        print(f"  {name:28s} {json.dumps(row)}")


if __name__ == "__main__":
    main()
