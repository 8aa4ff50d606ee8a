"""Peak GPU memory per stage and denoising speed under a memory budget, against the fully resident run.

Builds real-width random checkpoints (reduced depth; `wan.testing.real_width`), then for each target
runs the whole pipeline (text encoding, image encoding, denoising, decode, mp4) twice in this process:
fully resident (`--gpu-memory auto` on a large card) and with the target's budget. One table (or
`--json`): the plan, peak RESERVED GiB per stage, seconds per denoising step, and the ratio of the
two denoising times.

Reduced depth: the checkpoint has L layers with L >= (blocks the plan keeps resident at FULL depth)
+ 3, so the budgeted run keeps exactly as many blocks resident as a full-depth run would and its
peaks ARE the full-depth peaks. Full-depth figures that are extrapolated say so:
- resident peak: measured + (full depth - L) x block bytes;
- s/step and ratio: each extra block at the per-block time of the reduced runs (resident block:
  resident denoise time / L, an upper bound that includes the embeddings and head; streamed block:
  that plus the measured extra per streamed block).
A target the planner finds infeasible is run at the planner's minimum budget instead (and says so).
Before a target's runs, one forward of a one-block model at its shape takes the first-call costs
(kernel choices, cuDNN's attention plan), so that neither run is charged them. `--rows-file` also
appends each finished row as one JSON line (kept when a caller's time limit stops the run).

Examples (benchmarks/README.md has the GPU command):
    python benchmarks/bench_memory.py --small                       # CPU dry run (simulated budget)
    python benchmarks/bench_memory.py --root /tmp/ckpt --json       # the budget targets, on CUDA
    python benchmarks/bench_memory.py --target t2v-A14B:832*480:81:8 --steps 2 --layers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magcache_generate.allocator import prefer_expandable_segments
from magcache_generate.budget import SIMULATE_ENV, memory_request
from magcache_generate.request import UserError
from magcache_generate.run import run_requests
from magcache_generate.validate import GenerateOptions, build_request
from wan import memory_plan
from wan.configs import TASKS
from wan.testing.real_width import real_transformer_config, write_real_width_checkpoint

GIB = 2**30
TARGETS = (
    "t2v-A14B:832*480:81:8",
    "t2v-A14B:1280*720:81:16",
    "ti2v-5B:1280*704:121:8",
    "i2v-A14B:832*480:81:8",
)


@dataclasses.dataclass(frozen=True)
class Target:
    task: str
    size: str
    frames: int
    budget: float  # GiB

    @classmethod
    def parse(cls, text: str) -> Target:
        task, size, frames, budget = text.split(":")
        return cls(task, size, int(frames), float(budget))

    @property
    def name(self) -> str:
        return f"{self.task} {self.size}x{self.frames} @{self.budget:g} GiB"

    @property
    def spec(self) -> str:
        """The --target text this target was parsed from (normalised)."""
        return f"{self.task}:{self.size}:{self.frames}:{self.budget:g}"


def full_depth_plan(
    target: Target, budget_gib: float, small: bool, quantize: str | None = None
) -> memory_plan.MemoryPlan | None:
    """The plan of the FULL-depth model (bf16; fp8 block Linears with `--quantize fp8`) at this
    budget, or None if infeasible."""
    width, height = (int(v) for v in target.size.split("*"))
    req = memory_plan.MemoryRequest(
        TASKS[target.task],
        real_transformer_config(target.task, small=small),
        width,
        height,
        target.frames,
        budget=int(budget_gib * GIB),
        image=TASKS[target.task].image == "required",
        vae_during_denoise=TASKS[target.task].image == "required",
        fp8_linears=quantize == "fp8",
    )
    try:
        return memory_plan.plan_memory(req)
    except memory_plan.PlanInfeasibleError:
        return None


def options(target: Target, ckpt: Path, out: Path, image: Path | None, args, budget: float | None):
    return GenerateOptions(
        task=target.task,
        size=target.size,
        frame_num=args.frames or target.frames,
        ckpt_dir=ckpt,
        convert_model_dtype=True,
        quantize=args.quantize,
        prompt="a red fox runs through the snowy forest",
        base_seed=1,
        image=image,
        sample_steps=args.steps,
        save_file=out,
        device=args.device,
        gpu_memory=None if budget is None or args.device == "cpu" else f"{budget}",
        cfg_batch=args.cfg_batch,
        overwrite=True,
    )


def run_once(opts: GenerateOptions, simulate: float | None) -> dict:
    """One pipeline run in this process; the sidecar record (or {'error': ...})."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if simulate is None:
        os.environ.pop(SIMULATE_ENV, None)
    else:
        os.environ[SIMULATE_ENV] = repr(simulate)
    try:
        request = build_request(opts)
        return run_requests([request], console=Console(file=io.StringIO()))[0]
    except UserError as err:
        return {"error": str(err)}
    finally:
        os.environ.pop(SIMULATE_ENV, None)


def warm_forward(target: Target, frames: int, device: str, small: bool) -> None:
    """One forward of a one-block DiT of the target's width at its latent shape, before its runs. The
    first call of each shape in a process pays one-off costs (SDPA's cuDNN backend builds, and may
    compile, an attention plan; the patch-embedding convolution and the GEMMs pick kernels); charged
    to the resident run (the first at this size) they would bias the ratio in the budgeted run's favour."""
    from wan.modules.transformer import WanTransformer

    spec = TASKS[target.task]
    cfg = real_transformer_config(target.task, layers=1, small=small)
    width, height = (int(v) for v in target.size.split("*"))
    latent = (frames - 1) // spec.vae_stride[0] + 1, height // spec.vae_stride[1], width // spec.vae_stride[2]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = WanTransformer(cfg).to(dtype).eval().requires_grad_(False)
    x = torch.randn(1, cfg.in_dim, *latent, device=device)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        model(x, torch.tensor([900], device=device), context)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def minimum_budget_gib(opts: GenerateOptions, budget: float) -> float:
    from wan.loading import read_transformer_config

    request = build_request(opts)
    folder = request.ckpt_dir / (TASKS[request.task].dit_folders[0])
    req = memory_request(request, read_transformer_config(folder), int(budget * GIB), batch=False)
    return memory_plan.minimum_budget(req) / GIB


def row(
    target: Target, resident: dict | None, budgeted: dict, layers: int, full_layers: int, note: str
) -> dict:
    """One target's figures; without the resident run (`--skip-resident`) only the budgeted ones."""
    steps = budgeted["steps_run"]
    tight = budgeted["timings_s"]["denoise"] / steps
    base = resident["timings_s"]["denoise"] / steps if resident is not None else None
    plan = budgeted.get("memory_plan", {})
    streamed_r = plan.get("streamed_blocks", 0)
    block = plan.get("block_gib", 0.0)
    extra_layers = full_layers - layers

    def peaks(record: dict | None, key: str = "gpu_reserved_gib") -> dict:
        stages = {} if record is None else record["peak_memory"].get("stages", {})
        return {k: v[key] for k, v in stages.items()}

    figures = {
        "target": target.name,
        "spec": target.spec,
        "note": note,
        "budget_gib": plan.get("budget_gib"),
        "layers": layers,
        "resident_blocks": plan.get("resident_blocks"),
        "streamed_blocks": streamed_r,
        "activation_chunk": plan.get("activation_chunk"),
        "t5_on_cpu": plan.get("t5_on_cpu"),
        "vae_tile_px": plan.get("vae_tile_px"),
        "estimated_gib": plan.get("estimated_peak_gib"),
        "reserved_gib": peaks(budgeted),
        "allocated_gib": peaks(budgeted, "gpu_allocated_gib"),
        "cuda_allocator": budgeted["peak_memory"].get("cuda_allocator"),
        "resident_reserved_gib": peaks(resident),
        "resident_allocated_gib": peaks(resident, "gpu_allocated_gib"),
        "host_rss_gib": budgeted["peak_memory"]["host_rss_gib"],
        "s_per_step": round(tight, 3),
    }
    if base is None:
        return figures | {"resident_s_per_step": None, "ratio": None, "full_depth_extrapolated": None}
    per_block = base / layers
    extra = (tight - base) / streamed_r if streamed_r else 0.0
    full_base = base + extra_layers * per_block
    full_tight = tight + extra_layers * (per_block + extra)
    return figures | {
        "resident_s_per_step": round(base, 3),
        "ratio": round(tight / base, 3),
        "full_depth_extrapolated": {
            "resident_denoise_reserved_gib": round(
                peaks(resident).get("denoise", 0.0) + extra_layers * block, 3
            ),
            "s_per_step": round(full_tight, 3),
            "ratio": round(full_tight / full_base, 3),
        },
    }


def print_table(rows: list[dict]) -> None:
    from rich.table import Table

    console = Console(width=max(Console().width, 180))

    table = Table(
        title="bench_memory: peak reserved GiB per stage (budgeted run); ratio = denoise time / resident"
    )
    for col in ("target", "plan", "text", "encode", "denoise", "decode", "s/step", "ratio", "full depth*"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["target"], f"[red]{r['error']}", *[""] * 7)
            continue
        res = r["reserved_gib"]
        plan = f"{r['resident_blocks']}+{r['streamed_blocks']}str of {r['layers']}"
        plan += f", chunk {r['activation_chunk']}" if r["activation_chunk"] else ""
        plan += f", tile {r['vae_tile_px']}" if r["vae_tile_px"] else ""
        plan += ", T5 cpu" if r["t5_on_cpu"] else ""
        plan += f" ({r['note']})" if r["note"] else ""
        full, base = r["full_depth_extrapolated"], r["resident_s_per_step"]
        table.add_row(
            r["target"],
            plan,
            *(
                f"{res[k]:.2f}" if k in res else "-"
                for k in ("encode_text", "encode_image", "denoise", "decode")
            ),
            f"{r['s_per_step']:.2f}" + (f" ({base:.2f})" if base is not None else ""),
            f"{r['ratio']:.3f}" if r["ratio"] is not None else "-",
            f"{full['s_per_step']:.2f} s/step, {full['ratio']:.3f}x" if full else "-",
        )
    table.caption = "* extrapolated from per-block times of the reduced-depth runs"
    console.print(table)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", action="append", help="TASK:W*H:FRAMES:BUDGET_GIB (repeatable)")
    parser.add_argument("--root", type=Path, default=None, help="where the checkpoints go (reused)")
    parser.add_argument("--layers", type=int, default=8, help="DiT depth of the benchmark checkpoints")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--frames", type=int, default=None, help="override every target's frame count")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="CPU dry run: narrow models, 5 frames")
    parser.add_argument(
        "--cfg-batch",
        choices=("auto", "on", "off"),
        default="off",
        help="--cfg-batch of both runs; off (default) so that the ratio measures streaming alone "
        "(auto would batch the resident run on a large card and not the budgeted one)",
    )
    parser.add_argument(
        "--skip-resident",
        action="store_true",
        help="run only the budgeted configuration (memory figures; no time ratio)",
    )
    parser.add_argument(
        "--quantize", choices=("fp8",), default=None, help="both runs with --quantize fp8 (fp8 block Linears)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--rows-file",
        type=Path,
        default=None,
        help="also append each finished row to this file as one JSON line (kept if a caller's timeout "
        "stops the run before the end)",
    )
    args = parser.parse_args()
    prefer_expandable_segments()  # as the CLI does, before the first CUDA allocation
    if args.small:
        args.device, args.frames = "cpu", args.frames or 5
    targets = [Target.parse(t) for t in (args.target or TARGETS)]
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    out = Path(tempfile.mkdtemp(prefix="bench_memory_out_"))
    rows = []
    started = time.perf_counter()
    warmed = False
    for target in targets:
        plan = full_depth_plan(target, target.budget, args.small, args.quantize)
        full_layers = real_transformer_config(target.task).num_layers
        streams = plan is not None and plan.streamed_blocks > 0
        layers = min(full_layers, max(args.layers, plan.resident_blocks + 3)) if streams else args.layers
        ckpt = root / f"{target.task}-L{layers}{'-small' if args.small else ''}"
        if not (ckpt / TASKS[target.task].t5_checkpoint).is_file():
            write_real_width_checkpoint(
                ckpt, target.task, layers=layers, device=args.device, small=args.small
            )
        image = None
        if TASKS[target.task].image == "required":  # ti2v-5B runs as text-to-video
            image = out / "first_frame.png"
            width, height = (int(v) for v in target.size.split("*"))
            gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
            Image.fromarray(gradient).save(image)
        warm_forward(target, args.frames or target.frames, args.device, args.small)
        if not warmed:  # CUDA context, cuBLAS/cuDNN handles and kernels: not charged to the first target
            warm = dataclasses.replace(
                options(target, ckpt, out / "warm.mp4", image, args, None), frame_num=5
            )
            run_once(dataclasses.replace(warm, sample_steps=1), None)
            warmed = True
        resident = None
        if not args.skip_resident:
            resident = run_once(options(target, ckpt, out / "resident.mp4", image, args, None), None)
        budget, note = target.budget, ""
        budgeted_opts = options(target, ckpt, out / "budget.mp4", image, args, budget)
        simulate = budget if args.device == "cpu" else None
        budgeted = run_once(budgeted_opts, simulate)
        if "error" in budgeted and "needs at least" in budgeted["error"]:
            budget = round(minimum_budget_gib(budgeted_opts, budget) + 0.05, 2)
            note = f"{target.budget:g} GiB infeasible by the planner; ran at its minimum {budget:g}"
            budgeted = run_once(
                options(target, ckpt, out / "budget.mp4", image, args, budget), simulate and budget
            )
        for record in (resident or {}, budgeted):
            if "error" in record:
                rows.append({"target": target.name, "spec": target.spec, "error": record["error"]})
                break
        else:
            rows.append(row(target, resident, budgeted, layers, full_layers, note))
        if args.rows_file is not None:
            with open(args.rows_file, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    if args.json:
        print(
            json.dumps(
                {
                    "device": device_name(args.device),
                    "seconds": round(time.perf_counter() - started, 1),
                    "steps": args.steps,
                    "quantize": args.quantize,
                    "rows": rows,
                }
            )
        )
    else:
        print_table(rows)
        print(
            f"total {time.perf_counter() - started:.0f} s on {device_name(args.device)}; checkpoints in {root}"
        )


if __name__ == "__main__":
    main()
