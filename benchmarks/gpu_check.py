"""The GPU check: runs the `cuda` tests, the speed benchmark at A14B width, the memory benchmark at the
budget targets and the "no budget flag" check, the fp8 block, and the CLI end to end (eager and
`--compile`), within a wall-clock budget, and writes ONE results file
(JSON) with every figure the speed and memory targets name.

    benchmarks/gpu_check.sh                                   # on a GPU machine (benchmarks/README.md)
    python benchmarks/gpu_check.py --out results.json         # the same, without the wheel set-up
    python benchmarks/gpu_check.py --small --out /tmp/gpu_check.json   # CPU dry run, tiny sizes
    python benchmarks/gpu_check.py --only speed_720p_compile --out ...  # a rerun of some parts

Each part runs as its own process (a crash or a hang costs only that part) with its own time limit,
never past the overall deadline (--deadline, 410 s: 7 minutes less the wrapper's start-up); one
that runs out is stopped and recorded as "timed out", one that no time is left for as "skipped".
The parts run in the order below (most needed first). The results file is rewritten after every
part, and on SIGTERM/SIGINT, so an outer `timeout` still leaves every figure measured so far. The
parts' output tails go to one log file beside it (`gpu_check.log`), so a remote run has two files to
fetch back. Estimates (seconds on one H100, start-up excluded) and how they were derived:
benchmarks/README.md, section "GPU check".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check_targets as targets_mod  # a sibling module of this script

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 410  # 7 minutes, less the wrapper's own start-up (wheels, CUDA probe)
SMALL_DEADLINE_S = 1800  # the CPU dry run on a small, busy host (2 cores)
MIN_PART_S = 15  # a part gets at least this much time, or is skipped
# math is left out: it materialises the L x L scores (86 GB at 480p) and is no candidate anyway.
SPEED_BACKENDS = "auto,cudnn,flash,efficient,fa3,fa2"  # those not installed are left out by the benchmark


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    argv: tuple[str, ...]  # after the Python executable, run in the repository root
    limit_s: int  # its own time limit
    estimate_s: int  # expected seconds on one H100 (benchmarks/README.md, "GPU check")


def speed_part(
    name: str,
    size: str,
    layers: int,
    *,
    compile_: bool,
    device: str,
    small: bool,
    limit: int,
    estimate: int,
    cfg_batch: bool = False,
) -> Part:
    argv = ["benchmarks/bench_transformer.py", "--json", "--device", device]
    if small:
        argv.append("--small")
    else:
        argv += f"--preset A14B --size {size} --layers {layers} --repeat 3 --warmup 2".split()
    if compile_:
        argv += ["--attention", "auto", "--compile"]
    elif (
        cfg_batch
    ):  # one CFG step: two batch-1 forwards vs one batch-2 forward (what --cfg-batch auto rests on)
        argv += ["--attention", "auto", "--cfg-batch"]
    else:
        argv += ["--attention", SPEED_BACKENDS]
    return Part(name, tuple(argv), limit, estimate)


def fp8_part(
    name: str, size: str, *, compile_: bool, device: str, small: bool, limit: int, estimate: int
) -> Part:
    """One real-width block in fp8 (`benchmarks/fp8_block.py`): errors against fp32 and bf16 Linears,
    and the speed of the fp8 matmul against bf16 Linears (compiled: those two variants only)."""
    argv = ["benchmarks/fp8_block.py", "--json", "--device", device]
    if small:
        argv.append("--small")
    else:
        argv += ["--size", size, "--repeat", "3", "--warmup", "2"]
    if compile_:
        argv += ["--compile", "--only", "bf16_linears,fp8_tensor_scaled_mm"]
    return Part(name, tuple(argv), limit, estimate)


def plan_parts(small: bool, device: str, logs: Path, ckpt_root: Path) -> list[Part]:
    specs = targets_mod.SMALL_MEMORY_TARGETS if small else targets_mod.MEMORY_TARGETS
    memory = ["benchmarks/bench_memory.py", "--json", "--root", str(ckpt_root), "--steps", "1"]
    memory += ["--rows-file", str(logs / "memory_rows.jsonl"), "--device", device]
    memory += ["--small", "--layers", "2"] if small else ["--layers", "6"]
    for spec in specs:
        memory += ["--target", spec]
    pytest = ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    pytest += ["--junitxml", str(logs / "cuda_tests.xml")]
    probe = ["benchmarks/gpu_check.py", "--probe", "--device", device] + (["--small"] if small else [])
    speed = dict(device=device, small=small)
    # the CLI end to end, eager then --compile (cold, then warm cache): A14B width, 4 blocks, 832x480x5
    cli = ["benchmarks/cli_check.py", "--json", "--device", device, "--root", str(ckpt_root)]
    cli += ["--small"] if small else []
    return [
        Part("probe", tuple(probe), 60, 5),
        Part("cuda_tests", tuple(pytest), 150, 60),
        speed_part("speed_480p", "832x480x81", 3, compile_=False, limit=60, estimate=15, **speed),
        speed_part("speed_720p", "1280x720x81", 2, compile_=False, limit=90, estimate=30, **speed),
        Part("memory", tuple(memory), 280, 210),
        speed_part(
            "speed_480p_cfgbatch",
            "832x480x81",
            3,
            compile_=False,
            cfg_batch=True,
            limit=45,
            estimate=15,
            **speed,
        ),
        fp8_part("fp8_block_480p", "832x480x81", compile_=False, limit=60, estimate=30, **speed),
        Part("cli_compile", tuple(cli), 420 if small else 180, 100),  # CPU: inductor compiles slowly
        speed_part("speed_480p_compile", "832x480x81", 3, compile_=True, limit=100, estimate=60, **speed),
        speed_part("speed_720p_compile", "1280x720x81", 2, compile_=True, limit=120, estimate=65, **speed),
        fp8_part("fp8_block_480p_compile", "832x480x81", compile_=True, limit=90, estimate=50, **speed),
        fp8_part("fp8_block_720p_compile", "1280x720x81", compile_=True, limit=110, estimate=60, **speed),
    ]


# ----------------------------------------------------------------------------------------------------
# Running the parts
# ----------------------------------------------------------------------------------------------------


class Stopped(Exception):
    """SIGTERM/SIGINT: stop the running part, write the results, exit."""


def _stop(signum: int, _frame: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the final write short
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signal.Signals(signum).name)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, python: str, logs: Path, time_left: float) -> tuple[dict, str]:
    """Run one part; (its record, its stdout)."""
    record: dict[str, Any] = {"command": " ".join([Path(python).name, *part.argv]), "limit_s": part.limit_s}
    record["estimate_s"] = part.estimate_s
    timeout = min(part.limit_s, time_left)
    if timeout < MIN_PART_S:
        record.update(status="skipped", wall_s=0.0, note=f"no time left ({time_left:.0f} s)")
        return record, ""
    out_path, err_path = logs / f"{part.name}.out", logs / f"{part.name}.err"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [python, *part.argv], cwd=REPO, stdout=out, stderr=err, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timed out"
            record["note"] = f"stopped after {timeout:.0f} s"
        except Stopped as why:
            _kill_group(proc)
            record.update(status="interrupted", rc=None, wall_s=round(time.monotonic() - start, 1))
            record["note"] = f"{why} during this part"
            raise Stopped(record, out_path.read_text(errors="replace")) from None
    record.update(status=status, rc=rc, wall_s=round(time.monotonic() - start, 1))
    if status == "failed":
        tail = err_path.read_text(errors="replace").strip().splitlines()[-3:]
        record["error_tail"] = tail
    return record, out_path.read_text(errors="replace")


def parse_part(name: str, stdout: str, logs: Path, data: dict) -> None:
    if name == "cuda_tests":
        data["cuda_tests"] = targets_mod.parse_pytest(stdout, logs / "cuda_tests.xml")
    elif name == "memory":
        rows, finished = targets_mod.memory_rows(stdout, logs / "memory_rows.jsonl")
        data["memory_rows"], data["memory_finished"] = rows, finished
    else:
        data[name] = targets_mod.last_json(stdout)


def build_report(args: argparse.Namespace, parts: dict, data: dict, started: float) -> dict:
    probe = data.get("probe") or {}
    speed = next((data[k] for k in ("speed_480p", "speed_720p") if data.get(k)), {})
    return {
        "schema": 1,
        "small": args.small,
        "device": probe.get("device") or speed.get("device"),
        "torch": probe.get("torch") or speed.get("torch"),
        "cuda": probe.get("cuda"),
        "ffmpeg": probe.get("ffmpeg"),
        "python": platform.python_version(),
        "deadline_s": args.deadline,
        "wall_s": round(time.monotonic() - started, 1),
        "parts": parts,
        "targets": targets_mod.evaluate(data, parts, small=args.small),
        "figures": {
            "speed": targets_mod.speed_figures(data),
            "fp8_block": {k: data[k] for k in targets_mod.FP8_PARTS if data.get(k)},
            "cli": targets_mod.cli_figures(data),
            "memory": data.get("memory_rows", []),
            "memory_finished": data.get("memory_finished"),
            "probe": probe,
            "cuda_tests": data.get("cuda_tests"),
        },
    }


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


LOG_TAIL_CHARS = 40_000  # of each part's stdout and stderr, in the one log file next to the results


def append_log(log: Path, name: str, record: dict, logs: Path) -> None:
    """Add a part's command, status and output tails to the combined log (one file for every part)."""
    with open(log, "a") as f:
        f.write(f"===== {name}: {record['status']} in {record.get('wall_s')} s: {record['command']}\n")
        for stream in ("out", "err"):
            path = logs / f"{name}.{stream}"
            text = path.read_text(errors="replace") if path.is_file() else ""
            if len(text) > LOG_TAIL_CHARS:
                text = (
                    f"[... {len(text) - LOG_TAIL_CHARS} characters left out ...]\n" + text[-LOG_TAIL_CHARS:]
                )
            f.write(f"----- std{stream}\n{text}{'' if text.endswith(chr(10)) or not text else chr(10)}")


def run_check(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    logs = Path(tempfile.mkdtemp(prefix="gpu_check_parts_"))  # raw outputs, junit XML, memory rows
    started = time.monotonic()
    parts: dict[str, dict] = {}
    data: dict[str, Any] = {}
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    todo = plan_parts(args.small, args.device, logs, args.ckpt_root)
    chosen = [p for p in todo if (not args.only or p.name in args.only) and p.name not in args.skip]
    code = 0
    try:
        for part in chosen:
            time_left = args.deadline - (time.monotonic() - started)
            print(f"[gpu_check] {part.name}: up to {min(part.limit_s, time_left):.0f} s", flush=True)
            record, stdout = run_part(part, args.python, logs, time_left)
            parts[part.name] = record
            parse_part(part.name, stdout, logs, data)
            append_log(log, part.name, record, logs)
            print(f"[gpu_check] {part.name}: {record['status']} in {record['wall_s']} s", flush=True)
            write_json(out, build_report(args, parts, data, started))
    except Stopped as why:
        if len(why.args) == 2:  # stopped while a part ran: keep what it printed (memory: finished rows)
            parts[part.name] = why.args[0]
            parse_part(part.name, why.args[1], logs, data)
            append_log(log, part.name, why.args[0], logs)
        code = 143
    report = build_report(args, parts, data, started)
    write_json(out, report)
    print("\n".join(targets_mod.summary_lines(report)))
    print(f"results: {out}; part outputs: {log} (raw: {logs})")
    return code


# ----------------------------------------------------------------------------------------------------
# --probe: the device, the versions, and the full-depth plans of `--gpu-memory auto` on it
# ----------------------------------------------------------------------------------------------------

# An H100 80GB as torch reports it (total; free once a CUDA context exists), for the CPU dry run.
SIMULATED_H100_GIB = (79.19, 78.69)
PROBE_SHAPES = (
    ("T2V-A14B 832x480x81", "t2v-A14B", 832, 480, 81),
    ("T2V-A14B 1280x720x81", "t2v-A14B", 1280, 720, 81),
    ("I2V-A14B 832x480x81", "i2v-A14B", 832, 480, 81),
    ("TI2V-5B 1280x704x121", "ti2v-5B", 1280, 704, 121),
)


def probe(device: str, small: bool) -> dict:
    import importlib.metadata

    import torch

    from magcache_generate.budget import AUTO_MARGIN_FIXED, AUTO_MARGIN_FRACTION, GIB
    from wan import memory_plan
    from wan.configs import TASKS
    from wan.testing.real_width import real_transformer_config

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        free, total = torch.cuda.mem_get_info(torch.device(device))
        name = torch.cuda.get_device_name(torch.device(device))
        capability = list(torch.cuda.get_device_capability(torch.device(device)))
    else:
        total, free = (int(g * GIB) for g in SIMULATED_H100_GIB)
        name, capability = "cpu (auto plans for a simulated H100 80GB)", None
    budget = max(0, free - AUTO_MARGIN_FIXED - int(AUTO_MARGIN_FRACTION * total))
    plans: dict[str, list[dict]] = {}
    for label, task, width, height, frames in PROBE_SHAPES:
        spec = TASKS[task]
        variants = plans[label] = []
        for weights, magcache in ((2, False), (2, True), (4, False), (4, True)):
            variant = f"{'bf16' if weights == 2 else 'fp32'}{', MagCache' if magcache else ''}"
            req = memory_plan.MemoryRequest(
                spec,
                real_transformer_config(task),
                width,
                height,
                frames,
                budget,
                weight_bytes=weights,
                residual_cache=magcache,
                image=spec.image == "required",
                vae_during_denoise=spec.image == "required",
            )
            try:
                plan = memory_plan.plan_memory(req, budget_source="--gpu-memory auto")
            except memory_plan.PlanInfeasibleError as err:
                variants.append({"variant": variant, "unchanged": False, "summary": f"infeasible: {err}"})
                continue
            unchanged = not (
                plan.streamed_blocks or plan.t5_on_cpu or plan.vae_tiled or plan.activation_chunk
            )
            summary = (
                f"{plan.resident_blocks} of {plan.num_layers} resident, T5 on {'CPU' if plan.t5_on_cpu else 'GPU'}, "
                f"decode {'tiled ' + str(plan.vae_tile_px) if plan.vae_tiled else 'untiled'}, "
                f"FFN {'chunk ' + str(plan.activation_chunk) if plan.activation_chunk else 'unchunked'}"
            )
            variants.append(
                {"variant": variant, "unchanged": unchanged, "summary": summary, "plan": plan.to_json()}
            )

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "device": name,
        "ffmpeg": ffmpeg_in_use(),
        "capability": capability,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "simulated": not cuda,
        "total_gib": round(total / GIB, 2),
        "free_gib": round(free / GIB, 2),
        "auto_budget_gib": round(budget / GIB, 2),
        "packages": {
            p: version(p)
            for p in ("imageio-ffmpeg", "ftfy", "pytest", "flash-attn", "flash_attn_3", "triton")
        },
        "auto_plans": plans,
    }


def ffmpeg_in_use() -> str:
    """The ffmpeg the pipeline's mp4 writer will run (its -version line), or why there is none."""
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        run = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=30)
    except (ImportError, RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        return f"none: {err}"
    first = (run.stdout.splitlines() or ["(no output)"])[0]
    return f"{exe}: {first}" if run.returncode == 0 else f"{exe}: exit {run.returncode}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    parser.add_argument(
        "--out", type=Path, default=default_out, help="results JSON (default $OUT/gpu_check.json)"
    )
    parser.add_argument("--device", default=os.environ.get("DEVICE", "cuda"))
    parser.add_argument("--small", action="store_true", help="CPU dry run: tiny widths, simulated budgets")
    parser.add_argument("--deadline", type=float, default=None, help=f"seconds for all parts ({DEADLINE_S})")
    parser.add_argument("--only", type=lambda s: s.split(","), default=[], help="comma list of parts to run")
    parser.add_argument("--skip", type=lambda s: s.split(","), default=[], help="comma list of parts to skip")
    parser.add_argument("--ckpt-root", type=Path, default=None, help="bench_memory checkpoints (reused)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the parts run with")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.device = "cpu"
    if args.probe:
        print(json.dumps(probe(args.device, args.small)))
        return 0
    if args.out is None:
        parser.error("--out is required when $OUT is not set")
    if args.device.startswith("cuda") and not _has_cuda(args.python):
        parser.error("no CUDA device here; the CPU dry run is --small")
    args.deadline = args.deadline or (SMALL_DEADLINE_S if args.small else DEADLINE_S)
    args.ckpt_root = args.ckpt_root or Path("/tmp") / f"gpu_check_ckpt{'_small' if args.small else ''}"
    return run_check(args)


def _has_cuda(python: str) -> bool:
    probe_cmd = [python, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"]
    return subprocess.run(probe_cmd, capture_output=True).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
