"""Aten ops one DiT block forward issues, counted on the meta device (no kernel runs, no memory).

    python benchmarks/count_block_ops.py                         # A14B width, 75,600 tokens (720p x 81)
    python benchmarks/count_block_ops.py --chunk 4096 --json
    PYTHONPATH=/path/to/other/tree python benchmarks/count_block_ops.py   # count another version

The block is built at real width (A14B: dim 5120, 40 heads, ffn 13824) in the bf16 regime
(`--convert-model-dtype`: bf16 parameters, bf16 text context) on the meta device, and one
`block(x, mod, context, runtime)` runs under a TorchDispatchMode that counts every aten op reaching
the dispatcher. Ops that launch no kernel on a GPU (views, metadata, allocations, no-op casts that
return their input) are counted apart as `free`; the rest (`compute`) is an upper bound on the
kernels an eager CUDA forward launches for the block (a composite op may fuse on CUDA, e.g. a fused
RMS norm). Attention itself counts as one op per call site.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import wan
from wan.modules.attention import AttentionPolicy
from wan.modules.block import Block, BlockRuntime, Modulation
from wan.modules.rope import grid_rope
from wan.modules.transformer import TransformerConfig

# Ops that launch no kernel: views, metadata, allocations.
FREE = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "alias", "unsqueeze",
    "squeeze", "as_strided", "detach", "unflatten", "split", "split_with_sizes", "chunk", "unbind",
    "empty", "empty_like", "empty_strided", "new_empty", "view_as_real", "view_as_complex", "lift_fresh",
    "_fused_sdp_choice", "_reshape_alias", "reshape", "flatten", "_to_copy_meta", "clone_meta", "promote_types",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched under it, split into compute and free (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.compute: Counter[str] = Counter()
        self.free: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        returns_input = any(id(t) in inputs for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        if name in FREE or (returns_input and not name.endswith("_") and "out" not in str(func)):
            self.free[name] += 1  # a view or a no-op cast (`.to` of a tensor already in that dtype)
        else:
            self.compute[name] += 1
        return out


def count(dim: int, heads: int, ffn: int, tokens: int, grid: tuple[int, int, int], chunk: int | None) -> dict:
    cfg = TransformerConfig(
        model_type="t2v", in_dim=16, out_dim=16, dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=1
    )
    policy = AttentionPolicy("auto")
    with torch.device("meta"):
        block = Block(cfg).to(torch.bfloat16).eval()
        x = torch.empty((1, tokens, dim))  # the float32 residual stream (blocks after the first)
        context = torch.empty((1, cfg.text_len, dim), dtype=torch.bfloat16)
        mod = Modulation(e=torch.empty((1, 1, dim)), e0=torch.empty((1, 1, 6, dim)), index=None)
    rope = grid_rope(cfg.head_dim, grid, torch.device("meta"))
    runtime = BlockRuntime(rope=rope, attention=policy, chunk=chunk)
    counter = OpCounter()
    with torch.inference_mode(), counter:
        block(x, mod, context, runtime)
    return {
        "source": wan.__file__,
        "tokens": tokens,
        "dim": dim,
        "heads": heads,
        "ffn_dim": ffn,
        "chunk": chunk,
        "compute_ops": sum(counter.compute.values()),
        "free_ops": sum(counter.free.values()),
        "compute_by_op": dict(counter.compute.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--ffn", type=int, default=13824)
    parser.add_argument("--grid", default="21,45,80", help="latent grid after patching: frames,height,width")
    parser.add_argument("--chunk", type=int, default=None, help="activation chunk in tokens (default: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    f, h, w = (int(v) for v in args.grid.split(","))
    result = count(args.dim, args.heads, args.ffn, f * h * w, (f, h, w), args.chunk)
    if args.json:
        print(json.dumps(result))
        return
    print(f"measured code: {result['source']}")
    print(
        f"one block, {result['tokens']} tokens, dim {args.dim}, chunk {args.chunk}: "
        f"{result['compute_ops']} compute ops (+{result['free_ops']} views/no-ops)"
    )
    for name, n in result["compute_by_op"].items():
        print(f"  {name:<28} {n:>5}")


if __name__ == "__main__":
    main()
