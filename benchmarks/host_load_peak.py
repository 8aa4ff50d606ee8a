"""Peak host RAM while loading a real-width DiT expert from float32 safetensors (the official files'
dtype), every block streamed: what a budgeted CUDA run holds in host memory for its DiT.

Writes a float32 checkpoint at the task's real width with a few blocks (one shard per block, one for
the rest; the smaller depths are hard links into the deepest one), then loads it in a fresh process
per (depth, storage) with every block streamed (`Placement(resident_blocks=0)`) and the resident part
(embeddings, time MLPs, head) and the two device buffers on the META device, which stands for the
GPU: host memory then holds exactly what it holds on a CUDA run (the streamed blocks' host buffers,
unpinned here, plus one tensor in flight). Reported per run: the process's peak resident set
(VmHWM), its resident set after importing torch (the baseline), and their difference.

Storages: `autocast` = the default float32 regime on CUDA (Linears stored bf16, `wan.weight_storage`),
`float32` = every parameter float32 (before bf16 storage), `bf16` = --convert-model-dtype.
The full-depth figure is EXTRAPOLATED: the deepest measurement plus (full depth - depth) x the
per-block slope between the two depths measured.

    python benchmarks/host_load_peak.py --root /tmp/fp32-a14b --depths 2 4 --storage autocast float32
    python benchmarks/host_load_peak.py --small          # a quick narrow run (the same code path)

The checkpoint is deleted afterwards unless --keep (an A14B block is 1.4 GB in float32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
STORAGES = ("autocast", "float32", "bf16")


def status_bytes(field: str) -> int:
    """A `Vm...` line of /proc/self/status in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# ----------------------------------------------------------------------------------------------------
# The checkpoint


def write_fp32_checkpoint(root: Path, task: str, depth: int, small: bool) -> Path:
    """A float32 transformer folder with `depth` blocks: shard 0 holds everything but the blocks,
    shard i+1 block i. Values are random (their size is what matters here)."""
    import torch
    from safetensors.torch import save_file

    from wan.checkpoint_layout import CONFIG_FILE, INDEX_FILE
    from wan.modules.transformer import WanTransformer
    from wan.testing.dit import official_config_json
    from wan.testing.real_width import real_transformer_config

    cfg = real_transformer_config(task, layers=depth, small=small)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanTransformer(cfg).state_dict().items()}
    groups: list[list[str]] = [[k for k in shapes if not k.startswith("blocks.")]]
    groups += [[k for k in shapes if k.startswith(f"blocks.{i}.")] for i in range(depth)]
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        if not (root / name).exists():
            part = {k: torch.randn(shapes[k], generator=gen) / math.sqrt(shapes[k][-1]) for k in keys}
            save_file(part, str(root / f"{name}.partial"))
            del part
            (root / f"{name}.partial").rename(root / name)
        weight_map.update(dict.fromkeys(keys, name))
        total += sum(math.prod(shapes[k]) * 4 for k in keys)
    (root / CONFIG_FILE).write_text(json.dumps(official_config_json(cfg), indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return root


def shallower(full: Path, root: Path, depth: int) -> Path:
    """A `depth`-block folder whose shards are hard links to `full`'s (no extra disk)."""
    from wan.checkpoint_layout import CONFIG_FILE, INDEX_FILE

    root.mkdir(parents=True, exist_ok=True)
    config = json.loads((full / CONFIG_FILE).read_text())
    config["num_layers"] = depth
    index = json.loads((full / INDEX_FILE).read_text())
    keep = {
        k: v
        for k, v in index["weight_map"].items()
        if not k.startswith("blocks.") or int(k.split(".")[1]) < depth
    }
    # shard names say "-of-N": rename them to this depth's count, as a real folder would
    names = sorted(set(keep.values()))
    renamed = {
        old: f"diffusion_pytorch_model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        for i, old in enumerate(names)
    }
    for old, new in renamed.items():
        if not (root / new).exists():
            os.link(full / old, root / new)
    weight_map = {k: renamed[v] for k, v in keep.items()}
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return root


# ----------------------------------------------------------------------------------------------------
# One measurement (in a fresh process)


def measure(folder: Path, storage_name: str) -> dict:
    import torch

    from wan.loading import load_transformer
    from wan.placement import Placement, streamed_source
    from wan.weight_storage import WeightStorage

    baseline = status_bytes("VmRSS")
    storage = {
        "autocast": WeightStorage(torch.float32, autocast=torch.bfloat16),
        "float32": WeightStorage(torch.float32),
        "bf16": WeightStorage(torch.bfloat16),
    }[storage_name]
    model = load_transformer(
        folder, storage=storage, placement=Placement(torch.device("meta"), resident_blocks=0, pin=False)
    )
    source = streamed_source(model)
    host = sum(f.numel() * f.element_size() for block in source.host.values() for f in block.flats)
    return {
        "depth": len(model.blocks),
        "storage": storage_name,
        "weights": storage.describe(),
        "host_buffers_gib": host / GIB,
        "baseline_gib": baseline / GIB,
        "peak_gib": status_bytes("VmHWM") / GIB,
        "load_peak_gib": (status_bytes("VmHWM") - baseline) / GIB,
    }


def measure_in_subprocess(folder: Path, storage: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(folder), "--storage", storage],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", default="t2v-A14B")
    parser.add_argument("--root", type=Path, default=Path("/tmp/host-load-peak"))
    parser.add_argument("--depths", type=int, nargs=2, default=(2, 4), metavar=("SHALLOW", "DEEP"))
    parser.add_argument("--storage", nargs="+", choices=STORAGES, default=["autocast", "float32"])
    parser.add_argument("--small", action="store_true", help="narrow widths (a quick dry run)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.storage[0])))
        return

    from wan.configs import TASKS
    from wan.testing.real_width import REAL_DIT

    shallow, deep = sorted(args.depths)
    full_depth = REAL_DIT[TASKS[args.task].model_type][3]
    try:
        deep_dir = write_fp32_checkpoint(args.root / f"depth{deep}", args.task, deep, args.small)
        shallow_dir = shallower(deep_dir, args.root / f"depth{shallow}", shallow)
        rows = []
        for storage in args.storage:
            a, b = measure_in_subprocess(shallow_dir, storage), measure_in_subprocess(deep_dir, storage)
            per_block = (b["peak_gib"] - a["peak_gib"]) / (deep - shallow)
            rows += [a, b]
            rows.append(
                {
                    "depth": full_depth,
                    "storage": storage,
                    "weights": b["weights"],
                    "per_block_gib": per_block,
                    "peak_gib": b["peak_gib"] + (full_depth - deep) * per_block,
                    "extrapolated": True,
                }
            )
    finally:
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.task} DiT expert from float32 files, every block streamed (host RAM, GiB; VmHWM)")
    print(f"{'depth':>6} {'weights':<42} {'host buffers':>12} {'baseline':>9} {'peak':>8}  note")
    for r in rows:
        if r.get("extrapolated"):
            note = f"EXTRAPOLATED: {r['per_block_gib']:.3f} GiB per block"
            print(f"{r['depth']:>6} {r['weights']:<42} {'':>12} {'':>9} {r['peak_gib']:>8.2f}  {note}")
        else:
            print(
                f"{r['depth']:>6} {r['weights']:<42} {r['host_buffers_gib']:>12.3f} {r['baseline_gib']:>9.2f} "
                f"{r['peak_gib']:>8.2f}  measured"
            )


if __name__ == "__main__":
    main()
