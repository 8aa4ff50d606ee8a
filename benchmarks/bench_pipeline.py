"""Per-stage time and peak memory of a complete random-weight generation (the real CLI path).

    python benchmarks/bench_pipeline.py --task t2v-A14B --preset tiny
    python benchmarks/bench_pipeline.py --task ti2v-5B --preset mid --frame-num 9 --steps 4
    python benchmarks/bench_pipeline.py --task t2v-A14B --dim 5120 --layers 2 --device cuda   # real width

Builds (once, in --work-dir) a random checkpoint in the official layout, then times one run of
`magcache_generate.run.run_requests`: text encoding, expert loading, denoising, VAE decode, writing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console

from magcache_generate.request import MagCacheOptions, Request
from wan.configs import TASKS
from wan.testing.checkpoint import write_tiny_checkpoint

PRESETS = {"tiny": dict(dim=32, layers=2, vae_dim=4), "mid": dict(dim=256, layers=4, vae_dim=16)}
SIZES = {"t2v-A14B": "832*480", "i2v-A14B": "832*480", "ti2v-5B": "1280*704"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=TASKS, default="t2v-A14B")
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vae-dim", type=int)
    parser.add_argument("--size")
    parser.add_argument("--frame-num", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="--convert-model-dtype")
    parser.add_argument("--magcache", action="store_true")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    dim, layers = args.dim or preset["dim"], args.layers or preset["layers"]
    vae_dim = args.vae_dim or preset["vae_dim"]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    ckpt = work / f"{args.task}-d{dim}-l{layers}-v{vae_dim}"
    if not ckpt.exists():
        write_tiny_checkpoint(ckpt, args.task, dim=dim, num_layers=layers, vae_dim=vae_dim)
    task = TASKS[args.task]
    out = work / "out"
    out.mkdir(exist_ok=True)
    request = Request(
        task=args.task,
        ckpt_dir=ckpt,
        prompt="a cat walks on the grass, realistic",
        size=args.size or SIZES[args.task],
        frame_num=args.frame_num,
        sample_solver="unipc",
        sample_steps=args.steps,
        sample_shift=task.sample_shift,
        guide_scale=task.guide_scale,
        base_seed=0,
        save_file=out / f"{ckpt.name}.mp4",
        image=args.image,
        overwrite=True,
        device=args.device,
        convert_model_dtype=args.bf16,
        magcache=MagCacheOptions(enabled=args.magcache),
    )
    from magcache_generate.run import run_requests

    [result] = run_requests([request], console=Console(stderr=True))
    summary = {
        "task": args.task,
        "dim": dim,
        "layers": layers,
        "vae_dim": vae_dim,
        "size": request.size,
        "frames": args.frame_num,
        "steps": args.steps,
        "device": result["device"],
        "timings_s": result["timings_s"],
        "s_per_step": round(result["timings_s"]["denoise"] / result["steps_run"], 4),
        "peak_memory": result["peak_memory"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
