"""umT5 encode of a short prompt: padded to ``text_len`` (upstream) vs its real tokens only (ours).

Random weights at the real umT5-XXL widths (dim 4096, ffn 10240, 64 heads, 32 buckets) with a few
layers and a small vocabulary (the embedding lookup costs nothing either way). The padded run is
upstream's: ids padded to 512 with the key mask, then the real rows kept; the real-token run is
``TextEncoder.encode``. Both give the same real rows (their largest difference is printed), so the
ratio is the time the padded positions cost.

Examples:
    python benchmarks/bench_text_encoder.py --layers 2 --dtype bf16
    python benchmarks/bench_text_encoder.py --layers 2 --dtype fp32 --tokens 40 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan.testing.text import tiny_t5_state_dict
from wan.text_encoder import TextEncoder, text_encoder_from_state_dict

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
XXL = {"dim": 4096, "dim_ffn": 10240, "num_heads": 64}  # umt5-xxl, as the official checkpoint


class FixedTokens:
    """A tokenizer stand-in: every prompt is the same ``tokens`` ids (EOS last), padded to ``text_len``."""

    def __init__(self, tokens: int, vocab_size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (tokens,), generator=generator)
        self.ids[-1] = 1  # EOS

    def __call__(self, texts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(len(self.ids), text_len)
        ids = torch.zeros(len(texts), text_len, dtype=torch.long)
        mask = torch.zeros(len(texts), text_len, dtype=torch.long)
        ids[:, :n], mask[:, :n] = self.ids[:n], 1
        return ids, mask


def padded_encode(encoder: TextEncoder, tokenizer: FixedTokens, text_len: int) -> torch.Tensor:
    """Upstream's way: the whole padded row through the encoder, then its real rows."""
    ids, mask = tokenizer(["prompt"], text_len)
    return encoder(ids, mask)[0, : int(mask.sum())]


def timed(fn, repeats: int) -> tuple[list[float], list[float], torch.Tensor]:
    """Wall seconds and process CPU seconds (all threads) of each repeat, after one warm-up call.

    On a machine shared with other jobs the wall time stretches with the load; the CPU time much less."""
    out = fn()  # warm-up (allocator, oneDNN kernels)
    wall, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return wall, cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=40, help="real tokens of the prompt, EOS included")
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the text report")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = DTYPES[args.dtype]
    state = tiny_t5_state_dict(vocab_size=args.vocab, num_layers=args.layers, **XXL)
    encoder = text_encoder_from_state_dict(state, dtype=dtype)
    del state
    tokenizer = FixedTokens(args.tokens, args.vocab)

    padded_s, padded_cpu, padded = timed(
        lambda: padded_encode(encoder, tokenizer, args.text_len), args.repeats
    )
    real_s, real_cpu, real = timed(
        lambda: encoder.encode(["prompt"], tokenizer, args.text_len)[0], args.repeats
    )
    assert real.shape == padded.shape, (real.shape, padded.shape)
    diff = (real.float() - padded.float()).abs().max().item()
    scale = padded.float().abs().max().item()
    record = {
        "layers": args.layers,
        "dtype": args.dtype,
        "tokens": args.tokens,
        "text_len": args.text_len,
        "threads": torch.get_num_threads(),
        "padded_s": [round(s, 4) for s in padded_s],
        "real_s": [round(s, 4) for s in real_s],
        "padded_median_s": round(statistics.median(padded_s), 4),
        "real_median_s": round(statistics.median(real_s), 4),
        "speedup": round(statistics.median(padded_s) / statistics.median(real_s), 2),
        "padded_cpu_median_s": round(statistics.median(padded_cpu), 4),
        "real_cpu_median_s": round(statistics.median(real_cpu), 4),
        "cpu_speedup": round(statistics.median(padded_cpu) / statistics.median(real_cpu), 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "max_abs_diff": diff,
        "output_scale": round(scale, 3),
    }
    if args.json:
        print(json.dumps(record))
        return
    print(
        f"umT5 {args.layers} layer(s) at dim 4096 / ffn 10240 / 64 heads, {args.dtype}, "
        f"{torch.get_num_threads()} thread(s): a {args.tokens}-token prompt"
    )
    print(f"  padded to {args.text_len}: median {record['padded_median_s']:.3f} s  {record['padded_s']}")
    print(f"  real tokens only: median {record['real_median_s']:.3f} s  {record['real_s']}")
    print(
        f"  CPU seconds (all threads), median: padded {record['padded_cpu_median_s']:.3f}, "
        f"real {record['real_cpu_median_s']:.3f} ({record['cpu_speedup']:.1f}x); "
        f"load average {record['load_average_1min']}"
    )
    print(
        f"  speedup {record['speedup']:.1f}x; real rows differ by at most {diff:.3g} (output scale {scale:.2f})"
    )


if __name__ == "__main__":
    main()
