"""Peak live activation memory of a DiT forward at real widths and sizes, measured without a GPU.

    python benchmarks/activation_peak.py                      # table: A14B 480p/720p, ti2v-5B 720p
    python benchmarks/activation_peak.py --chunks none,4096 --json
    PYTHONPATH=/path/to/older/tree python benchmarks/activation_peak.py   # measure another version

How: the model is built on the meta device (shapes, dtypes and strides, but no memory and no compute)
in the bf16 regime (`--convert-model-dtype`: bf16 parameters, bf16 text context, float32 latents), and
one forward runs under a TorchDispatchMode that sees every tensor an op returns. It adds a storage's bytes when the
first tensor using it appears and subtracts them when the last one is freed (weakref finalizers on
the tensors), so `live` follows what the CUDA caching allocator would have allocated for activations:
inputs, every temporary, the cached RoPE table, the output. Parameters are not counted.

What it does not see: the attention kernel's internals. Attention is replaced by a stand-in that
allocates what a fused kernel (cuDNN / flash) allocates: the output in the query's layout and its
float32 softmax statistics (B x heads x L); SDPA's math fallback would materialise L x L scores, which
no fused kernel does. Also outside: cuBLAS/cuDNN workspaces (tens of MiB) and allocator rounding.
Validated against an H100 run (peak allocated minus weights; benchmarks/README.md).

The same pass also counts the memory traffic of the element-wise work (every op except the GEMMs,
attention, views and allocations): bytes read plus bytes written, broadcast operands counted once.
Element-wise kernels are memory-bound, so traffic / bandwidth is a model of their time; it is a
model, not a timing.
"""

from __future__ import annotations

import argparse
import json
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import wan
from wan.modules.transformer import TransformerConfig, WanTransformer

GIB = 2**30


@dataclass(frozen=True)
class Case:
    name: str
    model_type: str
    dim: int
    heads: int
    ffn: int
    channels: int  # latent channels in and out
    latent: tuple[int, int, int]  # latent frames, height, width
    image: bool = False  # ti2v with an image: per-token timesteps (frame 0 at t=0)

    @property
    def tokens(self) -> int:
        f, h, w = self.latent
        return f * (h // 2) * (w // 2)


CASES = {
    # 81 frames -> 21 latent frames; VAE stride 8 (Wan2.1 VAE) for A14B, 16 (Wan2.2 VAE) for ti2v-5B
    "a14b-480p": Case("A14B 832x480x81", "t2v", 5120, 40, 13824, 16, (21, 60, 104)),
    "a14b-720p": Case("A14B 1280x720x81", "t2v", 5120, 40, 13824, 16, (21, 90, 160)),
    "ti2v-720p": Case("ti2v-5B 1280x704x121", "ti2v", 3072, 24, 14336, 48, (31, 44, 80)),
    "ti2v-720p-image": Case("ti2v-5B 1280x704x121 +img", "ti2v", 3072, 24, 14336, 48, (31, 44, 80), True),
}


# Ops that move no data (views, allocations, metadata) or that are not element-wise (GEMMs).
NO_TRAFFIC = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "alias", "unsqueeze",
    "squeeze", "as_strided", "detach", "unflatten", "split", "split_with_sizes", "chunk", "unbind",
    "empty", "empty_like", "empty_strided", "new_empty", "view_as_real", "view_as_complex", "_fused_sdp_choice",
    "lift_fresh", "_to_copy_meta",
}  # fmt: skip
GEMMS = {"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "convolution", "_convolution", "conv3d"}


def footprint(t: torch.Tensor) -> int:
    """Bytes a kernel touches in `t`: broadcast (stride-0) dimensions counted once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def op_traffic(name: str, args: object, out: object) -> int:
    """Bytes an element-wise op reads and writes. An output that is one of the inputs unchanged (a
    no-op `.to` / `.float()` / `type_as`) moves nothing; an in-place op reads and writes its target."""
    inputs = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    in_place = name.endswith("_") or "out" in name

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return (
            a.untyped_storage()._cdata == b.untyped_storage()._cdata
            and a.storage_offset() == b.storage_offset()
        )

    if not in_place and outputs and all(any(same(o, i) for i in inputs) for o in outputs):
        return 0
    return sum(footprint(t) for t in inputs) + sum(footprint(t) for t in outputs if not in_place)


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live storages created by ops run under it (see the module docstring), and
    the element-wise traffic."""

    def __init__(self, external: list[torch.Tensor]):
        super().__init__()
        self.traffic = 0
        self.external = {t.untyped_storage()._cdata for t in external}  # parameters: never counted
        self.live = self.peak = 0
        self.peak_op = ""
        self._users: dict[int, int] = {}  # storage -> tracked tensors using it
        self._bytes: dict[int, int] = {}
        self._tracked: set[int] = set()  # id() of tracked tensor objects

    def track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if id(t) in self._tracked or key in self.external:
            return
        if key not in self._users:
            self._users[key] = 0
            self._bytes[key] = t.untyped_storage().nbytes()
            self.live += self._bytes[key]
        self._users[key] += 1
        self._tracked.add(id(t))
        weakref.finalize(t, self._release, key, id(t))

    def _release(self, key: int, tensor_id: int) -> None:
        self._tracked.discard(tensor_id)
        self._users[key] -= 1
        if self._users[key] == 0:
            del self._users[key]
            self.live -= self._bytes.pop(key)

    def note(self, where: str) -> None:
        if self.live > self.peak:
            self.peak, self.peak_op = self.live, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name not in NO_TRAFFIC and name not in GEMMS:
            self.traffic += op_traffic(name, (args, kwargs), out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        self.note(func.__name__)
        return out


def fused_attention_standin(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """What a fused SDPA kernel allocates: the output in the query's layout and float32 statistics."""
    b, heads, length, _ = q.shape
    if q.stride(1) < q.stride(2):  # query is a [B, L, heads, D] tensor seen as [B, heads, L, D]
        out = torch.empty((b, length, heads, v.shape[-1]), dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        out = torch.empty((b, heads, length, v.shape[-1]), dtype=q.dtype, device=q.device)
    logsumexp = torch.empty((b, heads, length), dtype=torch.float32, device=q.device)
    del logsumexp
    return out


def measure(case: Case, layers: int, chunk: int | None) -> dict:
    cfg = TransformerConfig(
        model_type=case.model_type,
        in_dim=case.channels,
        out_dim=case.channels,
        dim=case.dim,
        ffn_dim=case.ffn,
        num_heads=case.heads,
        num_layers=layers,
    )
    import wan.modules.rope as rope

    for cached in ("grid_rope", "grid_freqs"):  # the per-grid RoPE table is part of the forward's memory
        if hasattr(rope, cached):
            getattr(rope, cached).cache_clear()
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention_standin
    legacy = _legacy_tree()
    if legacy is not None:  # an older tree: adapt the two spots that need values or a real device
        legacy_linear_fp32 = legacy.linear_fp32
        legacy.bool = lambda value: True  # embed_time's bool(tensor): one timestep per sample (uniform)
        legacy.linear_fp32 = lambda layer, x: F.linear(x.float(), layer.weight.float(), layer.bias.float())
    try:
        with torch.device("meta"):
            model = WanTransformer(cfg).to(torch.bfloat16).eval()
            if chunk is not None:
                model.activation_chunk = chunk
            x = torch.empty((1, case.channels, *case.latent))
            context = torch.empty((1, cfg.text_len, cfg.text_dim), dtype=torch.bfloat16)
            t = torch.empty((1,), dtype=torch.int64)
        if case.image:  # built as the sampling loop builds it (values [0, t] and a token index)
            from wan.conditioning import Conditioning

            t = Conditioning(first_frame=x[:, :, :1]).model_timestep(900, x)
        mode = LiveBytes([*model.parameters(), *model.buffers()])
        with torch.inference_mode(), mode:
            for tensor in (x, context, *tree_leaves(vars(t) if case.image else t)):  # inputs: on the GPU too
                mode.track(tensor)
            out = model(x, t, context)
            mode.note("output")
            del out
    finally:
        F.scaled_dot_product_attention = original
        if legacy is not None:
            del legacy.bool
            legacy.linear_fp32 = legacy_linear_fp32
    return {
        "case": case.name,
        "tokens": case.tokens,
        "layers": layers,
        "activation_chunk": model.activation_chunk if chunk is not None else None,
        "peak_bytes": mode.peak,
        "peak_gib": round(mode.peak / GIB, 3),
        "bytes_per_token": round(mode.peak / case.tokens),
        "bytes_per_token_per_dim": round(mode.peak / case.tokens / case.dim, 2),
        "peak_at": mode.peak_op,
        "elementwise_gb": round(mode.traffic / 1e9, 2),
        "elementwise_gb_per_block": round(mode.traffic / 1e9 / layers, 2),
    }


def _legacy_tree():
    """The transformer module of a tree from before TokenTimesteps (None for this one)."""
    import wan.modules.transformer as module

    return None if hasattr(module, "TokenTimesteps") else module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--layers", type=int, default=4, help="blocks in the forward (the H100 runs used 4)")
    parser.add_argument("--chunks", default="none,4096", help="activation_chunk values, 'none' = unchunked")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    chunks = [None if c.strip().lower() == "none" else int(c) for c in args.chunks.split(",")]
    names = args.cases.split(",")
    if _legacy_tree() is not None:  # an older tree: no token chunks, per-token timesteps read values
        chunks = [None]
        names = [n for n in names if not CASES[n].image]
    rows = [measure(CASES[name], args.layers, chunk) for name in names for chunk in chunks]
    a14b = {r["activation_chunk"]: r for r in rows if r["case"] == CASES["a14b-480p"].name}
    fits = {}
    for r in rows:
        if r["case"] == CASES["a14b-720p"].name and r["activation_chunk"] in a14b:
            small = a14b[r["activation_chunk"]]
            slope = (r["peak_bytes"] - small["peak_bytes"]) / (r["tokens"] - small["tokens"])
            fits[str(r["activation_chunk"])] = {
                "bytes_per_token": round(slope),
                "fixed_bytes": round(small["peak_bytes"] - slope * small["tokens"]),
            }
    result = {"source": wan.__file__, "regime": "bf16 parameters", "rows": rows, "a14b_linear_fit": fits}
    if args.json:
        print(json.dumps(result))
        return
    print(f"measured code: {result['source']}")
    print(
        f"{'case':<26} {'tokens':>7} {'chunk':>6} {'peak GiB':>9} {'B/token':>8} {'B/tok/dim':>9} "
        f"{'elem GB/blk':>11}  peak at"
    )
    for r in rows:
        chunk = "-" if r["activation_chunk"] is None else r["activation_chunk"]
        print(
            f"{r['case']:<26} {r['tokens']:>7} {chunk!s:>6} {r['peak_gib']:>9.3f} {r['bytes_per_token']:>8}"
            f" {r['bytes_per_token_per_dim']:>9.2f} {r['elementwise_gb_per_block']:>11.2f}  {r['peak_at']}"
        )
    for chunk, fit in fits.items():
        print(
            f"A14B fit (chunk {chunk}): peak = {fit['bytes_per_token']} B/token x tokens "
            f"+ {fit['fixed_bytes'] / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
