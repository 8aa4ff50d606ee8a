"""`--t5-fsdp` under torchrun: what each rank's host memory and text stage cost with the text encoder
on every rank (plain) and on the replica's writer only (`--t5-fsdp`: one rank encodes, the context is
broadcast).

The checkpoint is the tiny demo one (random weights), except the umT5: real width (dim 4096, ffn
10240, 64 heads) with `--t5-layers` layers and a `--t5-vocab` embedding (the real one: 24 layers,
256,384 pieces, 11.4 GB in bf16); the DiT reads its 4096-wide context. Each mode runs once through
`torchrun --standalone -m magcache_generate` with `--ulysses-size` = the world size; the figures come
from the run's sidecar (`parallel.peak_memory_by_rank`, the text-stage parts).

    python benchmarks/bench_t5_fsdp.py [--ranks 2] [--t5-layers 2] [--t5-vocab 64] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = "t2v-A14B"
T5_WIDTH = {"dim": 4096, "dim_attn": 4096, "dim_ffn": 10240, "num_heads": 64}


def write_checkpoint(root: Path, t5_layers: int, t5_vocab: int) -> Path:
    """The demo checkpoint with a real-width umT5 (and DiTs that read its 4096-wide context)."""
    import torch

    from wan.configs import TASKS
    from wan.testing.checkpoint import write_tiny_checkpoint
    from wan.testing.dit import tiny_transformer_config, write_transformer_folder
    from wan.testing.text import tiny_t5_state_dict, write_tiny_tokenizer

    cfg = TASKS[TASK]
    write_tiny_checkpoint(root, TASK, seed=2025)
    dit = tiny_transformer_config(
        cfg.model_type, dim=32, num_layers=2, ffn_dim=64, text_len=32, text_dim=4096
    )
    for i, folder in enumerate(cfg.dit_folders):
        for old in (root / folder).iterdir():
            old.unlink()
        write_transformer_folder(root / folder, dit, seed=2025 + i, shards=2)
    t5 = tiny_t5_state_dict(vocab_size=t5_vocab, num_layers=t5_layers, dtype=torch.bfloat16, **T5_WIDTH)
    torch.save(t5, root / cfg.t5_checkpoint)
    write_tiny_tokenizer(root / cfg.t5_tokenizer, vocab_size=min(t5_vocab, 64))
    return root


def run(ckpt: Path, out: Path, ranks: int, t5_fsdp: bool) -> dict:
    name = "t5_fsdp" if t5_fsdp else "plain"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    argv = [
        "-m",
        "magcache_generate",
        "--task",
        TASK,
        "--ckpt-dir",
        str(ckpt),
        "--prompt",
        "a cat on a surfboard",
    ]
    argv += ["--size", "832*480", "--frame-num", "5", "--sample-steps", "2", "--ulysses-size", str(ranks)]
    argv += ["--save-file", str(out / f"{name}.mp4"), *(["--t5-fsdp"] if t5_fsdp else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    done = subprocess.run([*launch, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{done.stderr[-3000:]}")
    sidecar = json.loads((out / f"{name}.json").read_text())
    peaks = sidecar["parallel"]["peak_memory_by_rank"]
    keys = ("host_pressure_gib", "host_file_backed_gib", "host_rss_gib")
    return {
        "mode": name,
        "by_rank": {r: {k: p.get(k) for k in keys} for r, p in sorted(peaks.items())},
        "encode_text_s": sidecar["timings_s"].get("encode_text"),
        "text_stage_s": sidecar.get("text_stage_s"),
        "total_s": sidecar.get("total_s"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--t5-vocab", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps the checkpoint between runs")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-t5-fsdp-"))
    ckpt = work / f"ckpt-l{args.t5_layers}-v{args.t5_vocab}"
    if not ckpt.is_dir():
        write_checkpoint(ckpt, args.t5_layers, args.t5_vocab)
    t5_bytes = (ckpt / "models_t5_umt5-xxl-enc-bf16.pth").stat().st_size
    print(json.dumps({"t5_file_gib": round(t5_bytes / 2**30, 3), "ranks": args.ranks}))
    out = work / "out"
    out.mkdir(exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    for t5_fsdp in (False, True):
        print(json.dumps(run(ckpt, out, args.ranks, t5_fsdp)))


if __name__ == "__main__":
    main()
