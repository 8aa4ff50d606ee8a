"""Time per transformer forward and peak memory, random weights, any width / latent size / dtype.

    python benchmarks/bench_transformer.py --preset tiny
    python benchmarks/bench_transformer.py --dim 1536 --heads 12 --ffn 8960 --layers 2 --latent 16x9x32x32
    python benchmarks/bench_transformer.py --preset ti2v-5B --layers 2 --latent 48x31x44x80 --dtype bf16 --device cuda

With two layer counts (--layers 1,3) it also prints the per-layer cost, to extrapolate to the full
depth (40 layers for A14B, 30 for ti2v-5B).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from wan.modules.transformer import TransformerConfig, WanTransformer
from wan.testing.dit import IN_OUT

PRESETS = {
    "tiny": dict(dim=32, heads=2, ffn=64, model_type="t2v", layers="2"),
    "mid": dict(dim=512, heads=4, ffn=1536, model_type="t2v", layers="4"),
    "A14B": dict(dim=5120, heads=40, ffn=13824, model_type="t2v", layers="1,2"),
    "ti2v-5B": dict(dim=3072, heads=24, ffn=14336, model_type="ti2v", layers="1,2"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(cfg: TransformerConfig, dtype: torch.dtype, device: str) -> WanTransformer:
    with torch.device(device):
        model = WanTransformer(cfg).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval().requires_grad_(False)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench(args: argparse.Namespace, layers: int) -> dict:
    c, f, h, w = (int(v) for v in args.latent.split("x"))
    in_dim, out_dim = IN_OUT[args.model_type]
    cfg = TransformerConfig(
        model_type=args.model_type,
        in_dim=in_dim,
        out_dim=out_dim,
        dim=args.dim,
        ffn_dim=args.ffn,
        num_heads=args.heads,
        num_layers=layers,
        text_len=args.text_len,
        text_dim=args.text_dim,
    )
    dtype, device = DTYPES[args.dtype], args.device
    model = build(cfg, dtype, device)
    x = torch.randn(1, 16 if args.model_type == "i2v" else c, f, h, w, device=device)
    y = torch.randn(1, 20, f, h, w, device=device) if args.model_type == "i2v" else None
    ctx = torch.randn(1, args.text_len, args.text_dim, device=device, dtype=dtype)
    t = torch.tensor([900], device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.repeat):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x, t, ctx, y)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return {
        "layers": layers,
        "tokens": f * h * w // 4,
        "params_M": round(params / 1e6, 2),
        "dtype": args.dtype,
        "device": device,
        "forward_s_median": round(statistics.median(times), 4),
        "peak_memory_MiB": round(peak_memory_mb(device), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=PRESETS)
    parser.add_argument("--dim", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--layers", help="one count or a comma list, e.g. 1,3")
    parser.add_argument("--model-type", choices=IN_OUT)
    parser.add_argument("--latent", default="16x5x16x16", help="C x F x H x W of the latent")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    preset = PRESETS.get(args.preset, PRESETS["tiny"])
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    results = [bench(args, int(n)) for n in str(args.layers).split(",")]
    if len(results) >= 2:
        a, b = results[0], results[-1]
        per_layer = (b["forward_s_median"] - a["forward_s_median"]) / (b["layers"] - a["layers"])
        results.append(
            {
                "per_layer_s": round(per_layer, 4),
                "fixed_s": round(a["forward_s_median"] - per_layer * a["layers"], 4),
            }
        )
    print(json.dumps(results, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
