"""Checkpoint loading throughput: a raw read, our DiT / umT5 / VAE loaders, and safetensors' memory-mapped
read + per-tensor cast, on real-width float32 checkpoints at a few depths.

  python benchmarks/bench_load.py --root /tmp/bench_load [--depths 1 2 4] [--task t2v-A14B] [--cold]

Each DiT is written at the task's real width (A14B: dim 5120, ffn 13824), float32, one shard per block,
and loaded cast to bf16 on the CPU. Figures are GiB of file per second, best of `--repeats`; warm means
the files are in the page cache (read once before), cold means the cache was dropped just before each
measurement (`/proc/sys/vm/drop_caches`, needs root; refused otherwise and said so). One checkpoint is on
disk at a time (written, measured, deleted).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wan.configs import TASKS
from wan.modules.transformer import WanTransformer
from wan.testing.dit import official_config_json
from wan.testing.real_width import real_transformer_config
from wan.testing.text import tiny_t5_state_dict
from wan.testing.vae import tiny_vae_state_dict

GIB = 2**30
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"


def write_float32_dit(folder: Path, task: str, layers: int, seed: int = 0) -> None:
    """An official-layout float32 DiT folder, written one block per shard (the host holds one block)."""
    cfg = real_transformer_config(task, layers=layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanTransformer(cfg).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        group = key.split(".")[1] if key.startswith("blocks.") else "rest"
        groups.setdefault(group, []).append(key)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(official_config_json(cfg), indent=2))
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, (_, keys) in enumerate(groups.items()):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {}
        for key in keys:
            shape = shapes[key]
            part[key] = torch.randn(shape, generator=gen) / math.sqrt(max(1, math.prod(shape[1:])))
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
        total += sum(v.numel() * 4 for v in part.values())
        del part
    (folder / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )


def write_t5(root: Path, task: str, layers: int) -> Path:
    """umT5 at real width (4096, ffn 10240, 64 heads), `layers` deep, in bf16 as the official file is."""
    path = root / TASKS[task].t5_checkpoint
    t5 = tiny_t5_state_dict(vocab_size=64, dim=4096, dim_ffn=10240, num_heads=64, num_layers=layers)
    torch.save({k: v.to(torch.bfloat16) for k, v in t5.items()}, path)
    return path


def write_vae(root: Path, task: str) -> Path:
    """The task's VAE at real width, float32 as the official file is."""
    spec = TASKS[task]
    if spec.vae_kind == "2.1":
        vae = tiny_vae_state_dict("2.1", dim=96)
    else:
        vae = tiny_vae_state_dict("2.2", dim=160, dec_dim=256)
    torch.save(vae, root / spec.vae_checkpoint)
    return root / spec.vae_checkpoint


def files_of(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors")) if path.is_dir() else [path]


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in files_of(path))


def raw_read(path: Path) -> None:
    buf = bytearray(64 * 2**20)
    for f in files_of(path):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def safetensors_mmap_cast(path: Path, dtype: torch.dtype) -> None:
    for f in files_of(path):
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118
                handle.get_tensor(key).to(dtype)


def torch_mmap_cast(path: Path, dtype: torch.dtype) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for value in state.values():
        value.to(dtype, copy=True)


def drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], object], nbytes: int, repeats: int, cold: bool) -> float:
    best = math.inf
    for _ in range(repeats):
        if cold:
            drop_caches()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        del result
    return nbytes / GIB / best


def run_case(name: str, path: Path, runs: dict[str, Callable[[], object]], repeats: int, modes: list[bool]):
    nbytes = size_of(path)
    for cold in modes:
        raw_read(path)  # warm the cache (cold: each run drops it first)
        figures = {label: measure(fn, nbytes, repeats, cold) for label, fn in runs.items()}
        ref = next(v for k, v in figures.items() if "mmap" in k)
        cells = "  ".join(f"{label} {v:5.2f}" for label, v in figures.items())
        print(
            f"{name:30s} {nbytes / GIB:5.2f} GiB {'cold' if cold else 'warm'}: {cells}  "
            f"ours/mmap {figures['ours'] / ref:.2f}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--task", default="t2v-A14B", choices=sorted(TASKS))
    parser.add_argument("--depths", type=int, nargs="*", default=[1, 2, 4], help="DiT blocks per checkpoint")
    parser.add_argument("--t5-layers", type=int, default=2, help="umT5 layers (0: skip the umT5)")
    parser.add_argument("--no-vae", action="store_true", help="skip the VAE")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="also measure after dropping the page cache")
    args = parser.parse_args()

    import wan

    bf16 = torch.bfloat16
    modes = [False]
    if args.cold:
        if drop_caches():
            modes.append(True)
        else:
            print("cold cache: refused (writing /proc/sys/vm/drop_caches needs root); warm only")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, loader from {Path(wan.__file__).parent}; "
        f"GiB/s of file, best of {args.repeats}"
    )
    # one checkpoint on disk at a time: written, measured, deleted
    args.root.mkdir(parents=True, exist_ok=True)
    try:
        if args.t5_layers:
            t5 = write_t5(args.root, args.task, args.t5_layers)
            runs = {
                "raw read": lambda: raw_read(t5),
                # cast to float32: loaded in bf16 on the CPU the tensors would stay mapped, nothing read
                "ours": lambda: wan.load_text_encoder(t5, dtype=torch.float32),
                "torch.load mmap + cast": lambda: torch_mmap_cast(t5, torch.float32),
            }
            run_case(f"umT5 bf16->fp32 x{args.t5_layers} layers", t5, runs, args.repeats, modes)
            t5.unlink()
        if not args.no_vae:
            vae = write_vae(args.root, args.task)
            runs = {
                "raw read": lambda: raw_read(vae),
                "ours": lambda: wan.load_vae(vae, dtype=bf16),
                "torch.load mmap + cast": lambda: torch_mmap_cast(vae, bf16),
            }
            run_case(f"VAE {TASKS[args.task].vae_kind} fp32->bf16", vae, runs, args.repeats, modes)
            vae.unlink()
        for depth in args.depths:
            folder = args.root / f"dit_{depth}"
            write_float32_dit(folder, args.task, depth)
            runs = {
                "raw read": lambda f=folder: raw_read(f),
                "ours": lambda f=folder: wan.load_transformer(f, dtype=bf16),
                "safetensors mmap + cast": lambda f=folder: safetensors_mmap_cast(f, bf16),
            }
            run_case(f"DiT {args.task} fp32->bf16 x{depth}", folder, runs, args.repeats, modes)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
