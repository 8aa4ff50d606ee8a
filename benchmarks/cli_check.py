"""The CLI end to end, eager and with `--compile`, on a real-width random checkpoint of reduced depth:
three runs of `python -m magcache_generate` in fresh processes, each reporting its sidecar.

1. `--compile off` (eager);
2. `--compile on` with an empty compile cache (cold: compiling counted in `compile_s`);
3. `--compile on` again with the same cache folder (warm: PyTorch's on-disk cache from run 2).

Per run: the process's wall time, the sidecar's stage timings, `compile_s` and the `compile` decision,
the text stage's parts (`text_stage_s`), the time to first step and its parts (`time_to_first_step`),
peak memory, and the frames' largest difference from the eager run's (uint8 levels). One table, or one
JSON object with `--json`. `--small` is a CPU dry run (narrow widths).

    python benchmarks/cli_check.py --root /tmp/ckpt --json                 # on CUDA
    python benchmarks/cli_check.py --small                                 # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = (("eager", "off"), ("compiled_cold", "on"), ("compiled_warm", "on"))
KEPT = ("total_s", "timings_s", "compile_s", "compile", "text_stage_s", "time_to_first_step", "steps_run")


def checkpoint(root: Path, task: str, layers: int, device: str, small: bool) -> Path:
    from wan.configs import TASKS
    from wan.testing.real_width import write_real_width_checkpoint

    ckpt = root / f"cli-{task}-L{layers}{'-small' if small else ''}"
    if not (ckpt / TASKS[task].t5_checkpoint).is_file():
        write_real_width_checkpoint(ckpt, task, layers=layers, device=device, small=small)
    return ckpt


def frames(folder: Path) -> np.ndarray | None:
    files = sorted(folder.glob("frame_*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files]) if files else None


def run_cli(argv: list[str], cache: Path) -> tuple[int, float, str]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "magcache_generate", *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    return proc.returncode, time.perf_counter() - start, proc.stderr.strip()[-2000:]


def run_all(args: argparse.Namespace, ckpt: Path, out: Path, cache: Path, runs: dict[str, dict]) -> None:
    """The three runs, in order, each recorded in `runs` as it finishes."""
    reference = None
    for name, mode in RUNS:
        save = out / f"{name}.mp4"
        argv = ["--task", args.task, "--ckpt-dir", str(ckpt), "--size", args.size]
        argv += ["--frame-num", str(args.frames), "--sample-steps", str(args.steps), "--device", args.device]
        argv += ["--prompt", "a red fox running through snow", "--base-seed", "0", "--compile", mode]
        argv += ["--save-file", str(save), "--save-frames", str(out / name)]
        rc, wall, err = run_cli(argv, cache)
        record: dict = {"compile_flag": mode, "rc": rc, "process_wall_s": round(wall, 2)}
        sidecar = save.with_suffix(".json")
        if rc != 0 or not sidecar.is_file():
            record["error"] = err.splitlines()[-1] if err else f"exit {rc}"
            runs[name] = record
            continue
        data = json.loads(sidecar.read_text())
        record.update({k: data.get(k) for k in KEPT})
        record["peak_gpu_reserved_gib"] = data.get("peak_memory", {}).get("gpu_reserved_gib")
        pixels = frames(out / name)
        if reference is None and name == "eager":
            reference = pixels
        elif reference is not None and pixels is not None and pixels.shape == reference.shape:
            record["max_abs_diff_vs_eager"] = int(np.abs(pixels.astype(int) - reference.astype(int)).max())
        runs[name] = record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=None, help="where the checkpoint goes (reused)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="CPU dry run: narrow widths")
    parser.add_argument("--task", default="t2v-A14B")
    parser.add_argument("--layers", type=int, default=4, help="DiT depth of the checkpoint")
    parser.add_argument("--size", default="832*480")
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (6; --small: 2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.device = "cpu"
    args.steps = args.steps or (2 if args.small else 6)
    root = args.root or Path(tempfile.mkdtemp(prefix="cli_check_"))
    started = time.perf_counter()
    ckpt = checkpoint(root, args.task, args.layers, args.device, args.small)
    build_s = time.perf_counter() - started
    out = Path(tempfile.mkdtemp(prefix="cli_check_out_"))
    cache = Path(tempfile.mkdtemp(prefix="cli_check_inductor_"))  # empty: the first compiled run is cold
    runs: dict[str, dict] = {}
    try:
        run_all(args, ckpt, out, cache, runs)
    finally:  # the videos, frames and compiled graphs of these runs are not kept
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    result = {
        "task": args.task,
        "device": args.device,
        "small": args.small,
        "layers": args.layers,
        "size": args.size,
        "frames": args.frames,
        "steps": args.steps,
        "checkpoint_build_s": round(build_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result))
        return
    for name, r in runs.items():
        if "error" in r:
            print(f"{name:<14} error: {r['error']}")
            continue
        ttfs = (r.get("time_to_first_step") or {}).get("total_s")
        print(
            f"{name:<14} process {r['process_wall_s']:7.2f} s, compile_s {r.get('compile_s')}, "
            f"denoise {r['timings_s'].get('denoise', 0):.2f} s, time to first step {ttfs} s, "
            f"text stage {r.get('text_stage_s')}, frames vs eager {r.get('max_abs_diff_vs_eager')}"
        )


if __name__ == "__main__":
    main()
