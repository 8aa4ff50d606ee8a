"""The GPU check's arithmetic (no torch, no subprocesses): read what each part printed, evaluate every
speed and memory target on it, and render the short human summary. `gpu_check.py` runs the parts;
`tests/test_gpu_check.py` feeds this module canned outputs.

Every target is `{"value", "target", "compare", "met", "unit", "how"}` (plus `"note"` when the value
could not be measured: then `value` is None and `met` is false). Figures that are not targets (s per
block per backend, peaks per stage, ...) go under `figures`.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

FRACTION_TARGET = 0.70  # DiT forward / measured bf16 matmul rate
STRETCH_SECONDS = 150.0  # T2V-A14B 480p 40 steps MagCache preset denoising (stretch)
MAGCACHE_PRESET_FORWARDS = 52  # of 80 (40 steps x CFG): the preset's computed forwards
RATIO_TARGET = 1.10  # budgeted denoising time / fully resident
AUTO_OVERHEAD_TARGET = (
    1.10  # no-flag pipeline step / two bare forwards: the check's tolerance (as RATIO_TARGET)
)
# A denoising step of the pipeline runs the DiT twice (CFG, cond and uncond). If CFG ever runs as one
# batch-2 forward by default, the "no budget flag" comparison must divide by that forward instead.
FORWARDS_PER_STEP = 2

# Speed parts: part name -> the shape label the targets use. The check also runs a compile variant
# of each (part name + "_compile"). A CFG batch-2 timing of bench_transformer belongs here too, as
# another part whose rows carry the batch size (see gpu_check.py, SPEED_PARTS).
SPEED_SHAPES = {"speed_480p": "A14B 832x480x81", "speed_720p": "A14B 1280x720x81"}
# fp8 block parts (benchmarks/fp8_block.py) -> shape label; targets: the fp8 matmul block at least
# FP8_SPEEDUP_TARGET x the bf16-Linear block (compiled), its update within FP8_ERROR_TARGET of bf16's.
FP8_PARTS = {
    "fp8_block_480p": "A14B 832x480x81",
    "fp8_block_480p_compile": "A14B 832x480x81",
    "fp8_block_720p_compile": "A14B 1280x720x81",
}
FP8_SPEEDUP_TARGET = 1.15
FP8_ERROR_TARGET = 0.03
# The eager block before RoPE became one complex64 product (one H100 80 GB, 2026-11-26, attention auto;
# benchmarks/README.md, "Measured on one H100"): the complex RoPE must not be slower on the same card.
PREVIOUS_EAGER_S_PER_BLOCK = {"A14B 832x480x81": 0.0823, "A14B 1280x720x81": 0.306}
PREVIOUS_CARD = "H100"
ROPE_RATIO_TARGET = 1.0
CFG_BATCH_PART = "speed_480p_cfgbatch"
CFG_BATCH_TARGET = 1.0  # one batch-2 CFG forward at least as fast as two batch-1 forwards
CLI_PART = "cli_compile"  # benchmarks/cli_check.py: the CLI eager, compiled cold, compiled warm
# Memory targets (bench_memory --target specs) -> (label, time-ratio target applies, speed part whose
# bare forward this shape's no-flag run is compared with).
MEMORY_TARGETS = {
    "t2v-A14B:832*480:81:8": ("T2V-A14B 832x480x81 @ 8 GiB", True, "speed_480p"),
    "i2v-A14B:832*480:81:8": ("I2V-A14B 832x480x81 @ 8 GiB", True, None),
    "t2v-A14B:1280*720:81:16": ("T2V-A14B 1280x720x81 @ 16 GiB", True, "speed_720p"),
    "ti2v-5B:1280*704:121:8": ("TI2V-5B 1280x704x121 @ 8 GiB", False, None),
}
# The CPU dry run (--small): the same code paths at tiny widths; the second target's budget is below
# what any plan meets, so bench_memory's "ran at the planner's minimum" path runs too.
SMALL_MEMORY_TARGETS = {
    "t2v-A14B:832*480:81:8": ("T2V-A14B 832x480 (small) @ 8 GiB simulated", True, "speed_480p"),
    "i2v-A14B:832*480:81:0.5": ("I2V-A14B 832x480 (small) @ 0.5 GiB simulated", True, None),
}


# ----------------------------------------------------------------------------------------------------
# Reading what the parts printed
# ----------------------------------------------------------------------------------------------------


def last_json(text: str) -> dict | None:
    """The last line of `text` that parses as a JSON object (the benchmarks print one with --json)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def read_rows_file(path: Path) -> list[dict]:
    """bench_memory --rows-file: one JSON row per finished target (a torn last line is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")
_FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)")


def parse_pytest(stdout: str, junit: Path | None) -> dict[str, Any]:
    """Counts and failing test names: from the JUnit XML when pytest got to write it, else from the
    short summary (-ra) and the final counts line of its output (absent when it was stopped)."""
    if junit is not None and junit.is_file():
        try:
            root = ET.parse(junit).getroot()
        except ET.ParseError:
            root = None
        if root is not None:
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            total = {
                k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
            }
            failing = [
                f"{case.get('classname', '')}::{case.get('name', '')}"
                for case in root.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None
            ]
            return {
                "source": "junit",
                "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
                "failed": total["failures"],
                "errors": total["errors"],
                "skipped": total["skipped"],
                "failing": failing,
            }
    counts: dict[str, int] = {}
    lines = stdout.strip().splitlines()
    if lines and re.search(r"\b(passed|failed|skipped|errors?|deselected)\b", lines[-1]):
        for number, word in _COUNT.findall(lines[-1]):
            counts["errors" if word.startswith("error") else word] = int(number)
    failing = [m.group(1) for line in lines if (m := _FAILED_LINE.match(line))]
    if not counts:
        return {
            "source": "none",
            "passed": None,
            "failed": None,
            "errors": None,
            "skipped": None,
            "failing": failing,
        }
    return {
        "source": "summary line",
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0),
        "errors": counts.get("errors", 0),
        "skipped": counts.get("skipped", 0),
        "failing": failing,
    }


def memory_rows(stdout: str, rows_file: Path | None) -> tuple[list[dict], bool]:
    """bench_memory's rows and whether its run finished (its final JSON) or they are partial."""
    final = last_json(stdout)
    if final is not None and "rows" in final:
        return final["rows"], True
    return (read_rows_file(rows_file) if rows_file is not None else []), False


# ----------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------


def target(value: Any, goal: Any, compare: str, unit: str, how: str, note: str | None = None) -> dict:
    if value is None:
        met = False
    elif compare == "<=":
        met = value <= goal
    elif compare == ">=":
        met = value >= goal
    else:  # "=="
        met = value == goal
    entry = {"value": value, "target": goal, "compare": compare, "met": bool(met), "unit": unit, "how": how}
    if note:
        entry["note"] = note
    return entry


def backend_row(speed: dict | None, name: str = "auto") -> dict | None:
    if not speed:
        return None
    for row in speed.get("results", []):
        if row.get("attention") == name and "error" not in row:
            return row
    return None


def not_measured(part: str, parts: dict) -> str:
    status = parts.get(part, {}).get("status", "not run")
    if status == "ok":
        return f"not measured: part {part} printed no result for it"
    return f"not measured: part {part} {status}"


def speed_note(speed: dict | None, part: str, parts: dict) -> str | None:
    """Why a speed part gives no `auto` row (None when it does)."""
    if backend_row(speed) is not None:
        return None
    errors = [
        r["error"] for r in (speed or {}).get("results", []) if r.get("attention") == "auto" and "error" in r
    ]
    return f"not measured: attention auto failed: {errors[0]}" if errors else not_measured(part, parts)


def speed_targets(data: dict, parts: dict, targets: dict) -> None:
    for part, shape in SPEED_SHAPES.items():
        for variant, name in (("eager", part), ("compiled", f"{part}_compile")):
            row = backend_row(data.get(name))
            note = speed_note(data.get(name), name, parts)
            layers = (data.get(name) or {}).get("layers_run")
            targets[f"dit_fraction_of_matmul/{shape}/{variant}"] = target(
                row and row["block_fraction_of_matmul"],
                FRACTION_TARGET,
                ">=",
                "fraction",
                f"bench_transformer, attention auto, {variant}: FLOP per block / s per block / the bf16 "
                f"8192^3 matmul rate measured in the same process ({layers} blocks run)",
                note,
            )
            if part == "speed_480p":
                forward = row and row["full_depth_forward_s"]
                targets[f"stretch_t2v_a14b_480p_40_steps_magcache_denoise_s/{variant}"] = target(
                    forward and round(MAGCACHE_PRESET_FORWARDS * forward, 1),
                    STRETCH_SECONDS,
                    "<=",
                    "s",
                    f"estimate: {MAGCACHE_PRESET_FORWARDS} forwards x the 40-block forward time "
                    f"extrapolated from {layers} measured blocks ({variant}, attention auto)",
                    note,
                )


def fp8_targets(data: dict, parts: dict, targets: dict) -> None:
    """The fp8 matmul block's speed-up over bf16 Linears (compiled parts) and its error (eager part)."""
    for part, shape in FP8_PARTS.items():
        row = ((data.get(part) or {}).get("variants") or {}).get("fp8_tensor_scaled_mm") or {}
        note = None if row else not_measured(part, parts) + " (or no fp8 matmul on this GPU)"
        if part.endswith("_compile"):
            targets[f"fp8_block_speedup/{shape}/compiled"] = target(
                row.get("speedup_vs_bf16_linears"),
                FP8_SPEEDUP_TARGET,
                ">=",
                "x",
                "fp8_block: bf16-Linear block s / fp8 _scaled_mm block s, one real-width block, compiled",
                note,
            )
        else:
            value = row.get("rel_error_update_vs_bf16_linears")
            targets[f"fp8_block_rel_error_vs_bf16/{shape}"] = target(
                value if value is None else round(value, 4),
                FP8_ERROR_TARGET,
                "<=",
                "fraction",
                "fp8_block: ||update_fp8 - update_bf16|| / ||update_bf16||, the block's update (output - "
                "input) with per-tensor fp8 weights and activations (_scaled_mm) vs bf16 Linears",
                note,
            )


def memory_targets(data: dict, parts: dict, targets: dict, specs: dict) -> None:
    rows = {row.get("spec"): row for row in data.get("memory_rows", [])}
    for spec, (label, timed, speed_part) in specs.items():
        budget = float(spec.rsplit(":", 1)[1])
        row = rows.get(spec)
        if row is None:
            note = not_measured("memory", parts)
        elif "error" in row:
            note = f"error: {row['error']}"
        else:
            note = row.get("note") or None  # set: the target's budget did not plan; it ran at another
        at_budget = row is not None and "error" not in row and note is None
        depth = f"{row['layers']} blocks" if row and "layers" in row else "blocks as run"
        stages = row.get("reserved_gib") if at_budget else None
        peak = max(stages.values()) if stages else None
        peak_note = note or (None if peak is not None else "no GPU peaks (a CPU run)")
        targets[f"peak_reserved_gib/{label}"] = target(
            peak,
            budget,
            "<=",
            "GiB",
            "bench_memory: max over stages (text, image, denoise, decode) of torch's peak reserved, "
            f"budgeted run, reduced depth ({depth}; the resident blocks are "
            "those of the full-depth plan, so the peaks are the full-depth peaks)",
            peak_note,
        )
        if spec.startswith("i2v"):
            encode = stages.get("encode_image") if stages else None
            targets[f"i2v_encode_peak_reserved_gib/{label}"] = target(
                encode,
                budget,
                "<=",
                "GiB",
                "bench_memory: torch's peak reserved during the image encode (encode_image stage) of the "
                "budgeted i2v run",
                note or (None if encode is not None else "no GPU peak for encode_image (a CPU run)"),
            )
        if not timed:
            continue
        ratio = row["ratio"] if at_budget else None
        targets[f"denoise_ratio/{label}"] = target(
            ratio,
            RATIO_TARGET,
            "<=",
            "x",
            "bench_memory: denoising s/step of the budgeted run / the fully resident run "
            f"(--gpu-memory auto), measured at reduced depth ({depth})",
            note,
        )
        full = (row or {}).get("full_depth_extrapolated", {}).get("ratio") if ratio is not None else None
        targets[f"denoise_ratio_full_depth_extrapolated/{label}"] = target(
            full,
            RATIO_TARGET,
            "<=",
            "x",
            "extrapolated to full depth from the reduced-depth runs (bench_memory's per-block model)",
            note,
        )
        if speed_part is not None:
            targets[f"no_flag_step_vs_bare_forwards/{label.split(' @')[0]}"] = no_flag_target(
                spec,
                row if row is not None and "error" not in row else None,
                data.get(speed_part),
                speed_part,
                parts,
            )


def no_flag_target(spec: str, row: dict | None, speed: dict | None, speed_part: str, parts: dict) -> dict:
    """The no-budget-flag run's s/step against FORWARDS_PER_STEP bare forwards of the same depth."""
    bare = backend_row(speed)
    _, size, frames, _ = spec.split(":")
    shape = f"{size.replace('*', 'x')}x{frames}"
    note = None
    value = None
    if row is None:
        note = not_measured("memory", parts)
    elif bare is None:
        note = speed_note(speed, speed_part, parts)
    elif speed.get("size") != shape or speed.get("preset") != "A14B":
        note = f"not comparable: {speed_part} ran {speed.get('preset')} {speed.get('size')}, the memory run {shape}"
    else:
        forward = bare["fixed_s"] + row["layers"] * bare["per_block_s"]
        value = round(row["resident_s_per_step"] / (FORWARDS_PER_STEP * forward), 3)
    return target(
        value,
        AUTO_OVERHEAD_TARGET,
        "<=",
        "x",
        "bench_memory's --gpu-memory auto run (the default, no flag): s/step / "
        f"({FORWARDS_PER_STEP} x a bare bench_transformer forward of the same depth, attention auto)",
        note,
    )


def rope_targets(data: dict, parts: dict, targets: dict) -> None:
    """The eager block now (complex RoPE) against the previous eager figure, on the same card model."""
    for part, shape in SPEED_SHAPES.items():
        row = backend_row(data.get(part))
        note = speed_note(data.get(part), part, parts)
        device = str((data.get(part) or {}).get("device") or "")  # the card the benchmark itself ran on
        value = None
        if row is not None and PREVIOUS_CARD not in device:
            note = f"not comparable: the previous figure is an {PREVIOUS_CARD}'s, this ran on {device or '?'}"
        elif row is not None:
            value = round(row["per_block_s"] / PREVIOUS_EAGER_S_PER_BLOCK[shape], 3)
        targets[f"eager_block_vs_previous/{shape}"] = target(
            value,
            ROPE_RATIO_TARGET,
            "<=",
            "x",
            f"bench_transformer eager s/block (attention auto) / {PREVIOUS_EAGER_S_PER_BLOCK[shape]} s, the "
            f"{PREVIOUS_CARD} figure before RoPE became one complex64 product",
            note,
        )


def cfg_batch_target(data: dict, parts: dict, targets: dict) -> None:
    """One CFG step as one batch-2 forward against two batch-1 forwards (bench_transformer --cfg-batch)."""
    row = backend_row(data.get(CFG_BATCH_PART)) or {}
    timing = row.get("cfg_batch") or {}
    shape = SPEED_SHAPES["speed_480p"]
    targets[f"cfg_batch_speedup/{shape}"] = target(
        timing.get("batched_speedup"),
        CFG_BATCH_TARGET,
        ">=",
        "x",
        "bench_transformer --cfg-batch: two batch-1 forwards s / one batch-2 forward s, blocks included, "
        f"attention auto (outputs agree to max abs {timing.get('max_abs_diff')})",
        None if timing else speed_note(data.get(CFG_BATCH_PART), CFG_BATCH_PART, parts),
    )


def compile_repays_target(data: dict, parts: dict, targets: dict) -> None:
    """Whether --compile repays its compile time over the 40-step A14B 480p MagCache run (estimate from
    the eager and compiled speed parts), with the figures the --compile auto rule uses beside it."""
    eager, compiled = backend_row(data.get("speed_480p")), backend_row(data.get("speed_480p_compile"))
    value, note, rule = None, None, {}
    if eager is None or compiled is None or compiled.get("compile_s") is None:
        missing = "speed_480p" if eager is None else "speed_480p_compile"
        note = speed_note(data.get(missing), missing, parts) or not_measured(missing, parts)
    else:
        saved = MAGCACHE_PRESET_FORWARDS * (eager["full_depth_forward_s"] - compiled["full_depth_forward_s"])
        value = round(saved - compiled["compile_s"], 1)
        rule = {
            "measured_compile_s": compiled["compile_s"],
            "measured_saved_s_per_block": round(eager["per_block_s"] - compiled["per_block_s"], 5),
        }
    entry = target(
        value,
        0.0,
        ">=",
        "s",
        f"estimate: {MAGCACHE_PRESET_FORWARDS} x (eager - compiled 40-block forward, extrapolated) - the "
        "compile seconds, T2V-A14B 832x480x81; compare magcache_generate/compile_choice.py's constants",
        note,
    )
    if rule:
        entry["rule_figures"] = rule
    targets["compile_repays_t2v_a14b_480p_40_steps_magcache_s"] = entry


def cli_target(data: dict, parts: dict, targets: dict) -> None:
    """The CLI ran end to end eager, compiled (cold cache) and compiled again (warm cache)."""
    runs = (data.get(CLI_PART) or {}).get("runs")
    if not runs:
        targets["cli_compile_runs"] = target(None, "ok", "==", "runs", "", not_measured(CLI_PART, parts))
        return
    errors = [f"{name}: {r['error']}" for name, r in runs.items() if "error" in r]
    targets["cli_compile_runs"] = target(
        "; ".join(errors) or "ok",
        "ok",
        "==",
        "runs",
        "cli_check: python -m magcache_generate --compile off, on (empty compile cache), on (warm cache), "
        "real-width A14B of reduced depth, 832x480, 5 frames; each run's sidecar read back",
    )


def plan_targets(data: dict, parts: dict, targets: dict) -> None:
    probe = data.get("probe") or {}
    plans = probe.get("auto_plans")
    if not plans:
        targets["auto_plan_keeps_everything_resident"] = target(
            None, "all resident", "==", "plan", "", not_measured("probe", parts)
        )
        return
    source = "simulated " if probe.get("simulated") else ""
    for shape, variants in plans.items():
        changed = [f"{v['variant']}: {v['summary']}" for v in variants if not v["unchanged"]]
        targets[f"auto_plan_keeps_everything_resident/{shape}"] = target(
            "; ".join(changed) or "all resident",
            "all resident",
            "==",
            "plan",
            f"the full-depth plan for --gpu-memory auto on this device ({source}"
            f"{probe.get('auto_budget_gib')} GiB budget), bf16 and fp32 weights, MagCache off and on: every "
            "block resident, T5 on the GPU, untiled decode, unchunked FFN",
        )


def cuda_tests_target(data: dict, parts: dict, targets: dict) -> None:
    result = data.get("cuda_tests")
    if not result or result.get("passed") is None:
        targets["cuda_tests"] = target(None, "0 failed", "==", "tests", "", not_measured("cuda_tests", parts))
        return
    bad = result["failed"] + result["errors"]
    value = f"{result['passed']} passed, {bad} failed, {result['skipped']} skipped"
    entry = target(value, "0 failed", "==", "tests", "python -m pytest -q -m cuda")
    entry["met"] = bad == 0 and result["passed"] > 0
    if result["failing"]:
        entry["failing"] = result["failing"]
    targets["cuda_tests"] = entry


def evaluate(data: dict, parts: dict, *, small: bool) -> dict[str, dict]:
    """Every target from the parsed part outputs (`data`: part name -> parsed, plus "memory_rows")."""
    targets: dict[str, dict] = {}
    cuda_tests_target(data, parts, targets)
    speed_targets(data, parts, targets)
    fp8_targets(data, parts, targets)
    memory_targets(data, parts, targets, SMALL_MEMORY_TARGETS if small else MEMORY_TARGETS)
    plan_targets(data, parts, targets)
    rope_targets(data, parts, targets)
    cfg_batch_target(data, parts, targets)
    compile_repays_target(data, parts, targets)
    cli_target(data, parts, targets)
    return targets


# ----------------------------------------------------------------------------------------------------
# Figures (not targets) and the human summary
# ----------------------------------------------------------------------------------------------------

SPEED_KEYS = (
    "ran",
    "per_block_s",
    "block_tflops",
    "block_fraction_of_matmul",
    "attention_s",
    "attention_tflops",
    "attention_fraction_of_matmul",
    "full_depth_forward_s",
    "full_depth_tflops",
    "peak_allocated_gib",
    "compile_s",
    "cfg_batch",
    "error",
)


def speed_figures(data: dict) -> dict:
    figures = {}
    for part, shape in SPEED_SHAPES.items():
        for variant, name in (
            ("eager", part),
            ("compiled", f"{part}_compile"),
            ("cfg_batch", f"{part}_cfgbatch"),
        ):
            speed = data.get(name)
            if not speed:
                continue
            figures[f"{shape}/{variant}"] = {
                "matmul_tflops": speed["matmul"]["tflops"],
                "layers_run": speed["layers_run"],
                "full_depth": speed["full_depth"],
                "full_depth_note": f"full_depth_* are extrapolated from {speed['layers_run']} measured blocks",
                "tokens": speed["tokens"],
                "block_flops": speed["block_flops"],
                "by_backend": {
                    r["attention"]: {k: r[k] for k in SPEED_KEYS if k in r} for r in speed["results"]
                },
            }
    return figures


def cli_figures(data: dict) -> dict:
    """Per CLI run: process wall, compile and denoise seconds, time to first step and its parts, the
    text stage's parts, and the frames' largest difference from the eager run."""
    result = data.get(CLI_PART) or {}
    figures = {}
    for name, r in (result.get("runs") or {}).items():
        if "error" in r:
            figures[name] = {"error": r["error"]}
            continue
        ttfs = r.get("time_to_first_step") or {}
        figures[name] = {
            "process_wall_s": r.get("process_wall_s"),
            "compile_s": r.get("compile_s"),
            "denoise_s": (r.get("timings_s") or {}).get("denoise"),
            "time_to_first_step_s": ttfs.get("total_s"),
            "time_to_first_step_parts_s": ttfs.get("parts_s"),
            "text_stage_s": r.get("text_stage_s"),
            "max_abs_diff_vs_eager": r.get("max_abs_diff_vs_eager"),
        }
    return figures


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def summary_lines(report: dict) -> list[str]:
    lines = [
        f"GPU check on {report.get('device', '?')}, torch {report.get('torch', '?')}: "
        f"{report.get('wall_s', 0):.0f} s of the {report.get('deadline_s')} s budget"
        + (" (CPU dry run, --small: no figure here is a GPU figure)" if report.get("small") else "")
    ]
    if "stand-in" in (report.get("ffmpeg") or ""):
        lines.append("  videos written by the OpenCV ffmpeg stand-in (mp4v): write times are not real")
    for name, part in report["parts"].items():
        extra = f" ({part['note']})" if part.get("note") else ""
        lines.append(f"  {name:<20} {part['status']:<11} {part.get('wall_s', 0):6.1f} s{extra}")
    met = sum(t["met"] for t in report["targets"].values())
    lines.append(f"targets: {met} of {len(report['targets'])} met")
    for name, t in report["targets"].items():
        mark = "MET " if t["met"] else ("n/a " if t["value"] is None else "MISS")
        line = f"  {mark} {name}: {_fmt(t['value'])} {t['unit']} (target {t['compare']} {_fmt(t['target'])})"
        if t.get("note"):
            line += f" [{t['note'][:120]}]"
        lines.append(line)
        if t.get("failing"):
            lines.extend(f"         failing: {f}" for f in t["failing"])
    for name, run in (report.get("figures", {}).get("cli") or {}).items():
        if "error" in run:
            lines.append(f"  CLI {name}: error: {run['error'][:120]}")
            continue
        parts = ", ".join(f"{k} {_fmt(v)}" for k, v in (run.get("time_to_first_step_parts_s") or {}).items())
        text = ", ".join(f"{k} {_fmt(v)}" for k, v in (run.get("text_stage_s") or {}).items())
        lines.append(
            f"  CLI {name}: {_fmt(run['process_wall_s'])} s process, compile {_fmt(run['compile_s'])} s, "
            f"denoise {_fmt(run['denoise_s'])} s, first step at {_fmt(run['time_to_first_step_s'])} s "
            f"({parts}); text stage: {text}; frames vs eager: {_fmt(run['max_abs_diff_vs_eager'])}"
        )
    return lines
