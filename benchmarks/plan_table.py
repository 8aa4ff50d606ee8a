"""The memory planner's figures for each task and size at a range of `--gpu-memory` budgets, computed on
any machine (no GPU, no weights): the table in README's "What each task needs" comes from this script.

Each row is `wan.memory_plan.plan_memory` for the full-depth official model in the default CUDA regime
(float32 parameters, autocast Linears stored bf16), with the default frame count and MagCache on (its
residuals counted), as the commands of README run. Columns: the estimated peak GPU memory (the largest
stage estimate; the planner's figure, not a measurement), the placement it chose, and the host RAM the
placement implies (streamed blocks in page-locked memory, the text encoder when it runs on the CPU, and
about 1 GiB for the process): an estimate from the same arithmetic.

    python benchmarks/plan_table.py                 # Markdown table
    python benchmarks/plan_table.py --budgets 10 20 --json
"""

from __future__ import annotations

import argparse
import json

from wan import memory_plan
from wan.configs import TASKS
from wan.memory_costs import GIB, OVERHEADS
from wan.testing.real_width import real_transformer_config

SHAPES = (  # (task, width, height, frames): the official sizes at their default frame counts
    ("t2v-A14B", 832, 480, 81),
    ("t2v-A14B", 1280, 720, 81),
    ("i2v-A14B", 832, 480, 81),
    ("i2v-A14B", 1280, 720, 81),
    ("ti2v-5B", 1280, 704, 121),
)
BUDGETS = (8, 12, 16, 24, 32, 48, 80)
PROCESS_GIB = 1.0  # torch, the CUDA context's host side, latents: a round figure


def request(task: str, width: int, height: int, frames: int, budget_gib: float) -> memory_plan.MemoryRequest:
    spec = TASKS[task]
    return memory_plan.MemoryRequest(
        spec,
        real_transformer_config(task),
        width,
        height,
        frames,
        budget=int(budget_gib * GIB),
        weight_bytes=4,
        autocast_linear_bytes=2,
        residual_cache=True,
        image=spec.image == "required",
        vae_during_denoise=spec.image == "required",
    )


def row(task: str, width: int, height: int, frames: int, budget_gib: float) -> dict:
    req = request(task, width, height, frames, budget_gib)
    out = {"task": task, "size": f"{width}*{height}", "frames": frames, "budget_gib": budget_gib}
    try:
        plan = memory_plan.plan_memory(req)
    except memory_plan.PlanInfeasibleError:
        out["feasible"] = False
        out["minimum_budget_gib"] = round(memory_plan.minimum_budget(req) / GIB, 1)
        return out
    t5_gib = (req.t5_bytes or OVERHEADS.t5_default_bytes) / GIB if plan.t5_on_cpu else 0.0
    host = plan.streamed_blocks * plan.block_bytes / GIB + t5_gib + PROCESS_GIB
    out.update(
        feasible=True,
        peak_gib=round(max(plan.estimates.values()) / GIB, 1),
        resident_blocks=plan.resident_blocks,
        num_layers=plan.num_layers,
        t5_on_cpu=plan.t5_on_cpu,
        vae_tile_px=plan.vae_tile_px,
        activation_chunk=plan.activation_chunk,
        host_ram_gib=round(host, 1),
    )
    return out


def placement(r: dict) -> str:
    blocks = (
        "all resident"
        if r["resident_blocks"] == r["num_layers"]
        else f"{r['resident_blocks']}/{r['num_layers']} resident"
    )
    parts = [blocks, "T5 CPU" if r["t5_on_cpu"] else "T5 GPU"]
    if r["vae_tile_px"]:
        parts.append(f"tiles {r['vae_tile_px']}")
    if r["activation_chunk"]:
        parts.append(f"chunk {r['activation_chunk']}")
    return ", ".join(parts)


def markdown(rows: list[dict], budgets: list[float]) -> str:
    head = "| task, size x frames | " + " | ".join(f"`--gpu-memory {b:g}`" for b in budgets) + " |"
    lines = [head, "|---" * (len(budgets) + 1) + "|"]
    for task, width, height, frames in SHAPES:
        cells = []
        for b in budgets:
            r = next(
                x
                for x in rows
                if x["task"] == task and x["size"] == f"{width}*{height}" and x["budget_gib"] == b
            )
            if not r["feasible"]:
                cells.append(f"no (needs {r['minimum_budget_gib']:g})")
            else:
                cells.append(f"{r['peak_gib']:g} GPU, {r['host_ram_gib']:g} host; {placement(r)}")
        lines.append(f"| {task} {width}*{height}x{frames} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [row(*shape, b) for shape in SHAPES for b in args.budgets]
    print(json.dumps(rows, indent=1) if args.json else markdown(rows, args.budgets))


if __name__ == "__main__":
    main()
