"""Tiled vs untiled Wan VAE decoding: accuracy and peak memory, on random weights at real widths.

Each memory measurement runs in a fresh subprocess: on CPU the peak resident set of the decode call
alone (the kernel's high-water mark is reset after the model is built), on CUDA
``torch.cuda.max_memory_allocated``. Random weights follow ``wan.testing.vae`` (same scales as the
golden checkpoints), so the accuracy numbers are for random, not trained, weights.

Examples:
    python benchmarks/bench_vae.py --kind 2.2 --frames 5 --compare 256x256 --sizes 128x128,256x256
    python benchmarks/bench_vae.py --kind 2.1 --frames 5 --compare 256x256 --sizes 256x256,512x512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan.testing.vae import tiny_vae_state_dict
from wan.vae import WanVAE, vae_from_state_dict

REAL_WIDTHS = {"2.1": (96, None), "2.2": (160, 256)}


def build_vae(args: argparse.Namespace) -> WanVAE:
    dim, dec_dim = REAL_WIDTHS[args.kind]
    state = tiny_vae_state_dict(
        args.kind, dim=args.dim or dim, dec_dim=args.dec_dim or dec_dim, seed=args.seed
    )
    return vae_from_state_dict(state, device=args.device)


def random_latents(vae: WanVAE, frames: int, size: str, seed: int) -> torch.Tensor:
    h, w = (int(v) for v in size.lower().split("x"))
    st, ss = vae.stride[0], vae.stride[1]
    if (frames - 1) % st or h % ss or w % ss:
        raise SystemExit(f"--frames must be 1+{st}k and sizes multiples of {ss} for the Wan{vae.kind} VAE")
    shape = (1, vae.z_dim, 1 + (frames - 1) // st, h // ss, w // ss)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(vae.device)


def decode(vae: WanVAE, z: torch.Tensor, tiled: bool, args: argparse.Namespace) -> torch.Tensor:
    if not tiled:
        return vae.decode(z)
    return vae.decode(z, tiled=True, tile_size=args.tile_size, tile_overlap=args.tile_overlap)


def _proc_status_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_one(args: argparse.Namespace) -> dict:
    """Child process: build, then decode once and report the decode's own peak memory."""
    torch.set_num_threads(args.threads)
    vae = build_vae(args)
    z = random_latents(vae, args.frames, args.child_size, args.seed)
    tiled = args.child_mode == "tiled"
    result: dict = {"size": args.child_size, "mode": args.child_mode}
    if vae.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before_kib = _proc_status_kib("VmRSS")
        reset = _reset_peak_rss()
    start = time.perf_counter()
    video = decode(vae, z, tiled, args)
    if vae.device.type == "cuda":
        torch.cuda.synchronize()
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    elif reset:
        result["peak_mib"] = (_proc_status_kib("VmHWM") - before_kib) / 1024
    else:  # whole-process peak (includes building the weights)
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["note"] = "ru_maxrss of the whole process"
    result["seconds"] = time.perf_counter() - start
    result["output_shape"] = list(video.shape)
    return result


def compare(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    vae = build_vae(args)
    z = random_latents(vae, args.frames, args.compare, args.seed)
    timings, videos = {}, {}
    for mode in ("untiled", "tiled"):
        start = time.perf_counter()
        videos[mode] = decode(vae, z, mode == "tiled", args)
        timings[mode] = time.perf_counter() - start
    diff = (videos["tiled"] - videos["untiled"]).abs()
    return {
        "size": args.compare,
        "latents": list(z.shape),
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "mean_abs_untiled": videos["untiled"].abs().mean().item(),
        "seconds": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", choices=["2.1", "2.2"], default="2.2")
    parser.add_argument("--dim", type=int, default=None, help="encoder width (real: 96 for 2.1, 160 for 2.2)")
    parser.add_argument("--dec-dim", type=int, default=None, help="2.2 decoder width (real: 256)")
    parser.add_argument("--frames", type=int, default=5, help="decoded frames, 1+4k")
    parser.add_argument("--compare", default=None, help="HxW: report tiled vs untiled differences here")
    parser.add_argument("--sizes", default="", help="comma-separated HxW list for the memory table")
    parser.add_argument("--tile-size", type=int, default=None, help="tile edge in latent cells")
    parser.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in latent cells")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-size", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_size:
        print(json.dumps(measure_one(args)))
        return
    if args.kind == "2.1" and args.dec_dim:
        parser.error("--dec-dim applies to the Wan2.2 VAE only")
    print(f"# Wan{args.kind} VAE, random weights, frames={args.frames}, device={args.device}", flush=True)
    if args.compare:
        print(json.dumps({"compare": compare(args)}), flush=True)
    passthrough = list(sys.argv[1:])
    for size in filter(None, args.sizes.split(",")):
        for mode in ("untiled", "tiled"):
            cmd = [sys.executable, __file__, *passthrough, "--child-size", size, "--child-mode", mode]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(
                    json.dumps({"size": size, "mode": mode, "error": done.stderr.strip()[-300:]}), flush=True
                )
                continue
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
