"""The GPU check's collector (benchmarks/gpu_check.py, gpu_check_targets.py) on canned benchmark
outputs: parsing, target evaluation, partial results, and the part runner's time limits. Nothing here
runs a benchmark."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import gpu_check_targets as gct  # noqa: E402


def speed_output(
    fraction: float,
    forward_s: float,
    *,
    layers: int = 3,
    compile_s: float | None = None,
    size: str = "832x480x81",
) -> str:
    rows = [
        {
            "attention": "auto",
            "ran": "sdpa-cudnn/cuda",
            "forward_s": 0.3,
            "fixed_s": 0.02,
            "per_block_s": 0.0939,
            "block_tflops": 446.0,
            "block_fraction_of_matmul": fraction,
            "attention_s": 0.036,
            "attention_tflops": 616.0,
            "attention_fraction_of_matmul": 0.774,
            "full_depth_forward_s": forward_s,
            "full_depth_tflops": 440.0,
            "peak_allocated_gib": 9.1,
            "compile_s": compile_s,
        },
        {"attention": "efficient", "error": "No available kernel"},
    ]
    result = {
        "device": "NVIDIA H100 80GB HBM3",
        "torch": "2.11.0+cu130",
        "preset": "A14B",
        "size": size,
        "tokens": 32760,
        "layers_run": layers,
        "full_depth": 40,
        "matmul": {"size": 8192, "dtype": "bf16", "tflops": 796.0},
        "block_flops": 41900000000000,
        "results": rows,
    }
    return "a warning on stdout\n" + json.dumps(result) + "\n"


def memory_row(spec: str, *, ratio: float, peaks: dict, layers: int = 7, note: str = "") -> dict:
    return {
        "target": spec,
        "spec": spec,
        "note": note,
        "layers": layers,
        "resident_blocks": 4,
        "streamed_blocks": 3,
        "reserved_gib": peaks,
        "resident_reserved_gib": {"denoise": 9.0},
        "s_per_step": round(2 * 0.7 * ratio, 3),
        "resident_s_per_step": 1.4,
        "ratio": ratio,
        "full_depth_extrapolated": {"s_per_step": 7.9, "ratio": ratio + 0.01},
    }


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">
<testsuite name="pytest" errors="0" failures="1" skipped="2" tests="14">
<testcase classname="tests.test_cuda" name="test_a" time="0.1"/>
<testcase classname="tests.test_cuda" name="test_compiled_blocks_match_eager_on_cuda" time="9">
<failure message="assert False">trace</failure></testcase>
</testsuite></testsuites>"""

PROBE = {
    "device": "NVIDIA H100 80GB HBM3",
    "torch": "2.11.0+cu130",
    "cuda": "13.0",
    "simulated": False,
    "auto_budget_gib": 76.6,
    "auto_plans": {
        "T2V-A14B 832x480x81": [
            {"variant": "bf16", "unchanged": True, "summary": "40 of 40 resident, ..."},
            {"variant": "fp32", "unchanged": True, "summary": "40 of 40 resident, ..."},
        ],
        "T2V-A14B 1280x720x81": [
            {"variant": "fp32, MagCache", "unchanged": False, "summary": "38 of 40 resident, ..."}
        ],
    },
}


@pytest.fixture
def canned(tmp_path):
    """Parsed outputs as run_check collects them: the 720p compile part timed out, the memory part
    stopped before its last target (rows from the rows file only)."""
    junit = tmp_path / "cuda_tests.xml"
    junit.write_text(JUNIT)
    rows_file = tmp_path / "memory_rows.jsonl"
    rows = [
        memory_row(
            "t2v-A14B:832*480:81:8",
            ratio=1.04,
            peaks={"encode_text": 0.3, "denoise": 7.6, "decode": 7.1},
        ),
        memory_row(
            "i2v-A14B:832*480:81:8",
            ratio=1.02,
            peaks={"encode_text": 0.3, "denoise": 8.4},
            note="8 GiB infeasible by the planner; ran at its minimum 8.45",
        ),
        memory_row(
            "t2v-A14B:1280*720:81:16",
            ratio=1.12,
            peaks={"encode_text": 12.1, "denoise": 15.8, "decode": 9.0},
            layers=12,
        ),
    ]
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    data = {"probe": PROBE}
    data["cuda_tests"] = gct.parse_pytest("", junit)
    data["memory_rows"], data["memory_finished"] = gct.memory_rows("killed\n", rows_file)
    data["speed_480p"] = gct.last_json(speed_output(0.66, 3.8))
    data["speed_720p"] = gct.last_json(speed_output(0.71, 13.0, layers=2, size="1280x720x81"))
    data["speed_480p_compile"] = gct.last_json(speed_output(0.74, 2.85, compile_s=41.0))
    parts = {
        name: {"status": "ok", "wall_s": 1.0}
        for name in ("probe", "cuda_tests", "speed_480p", "speed_720p", "speed_480p_compile")
    }
    parts["memory"] = {"status": "timed out", "wall_s": 280.0}
    parts["speed_720p_compile"] = {"status": "skipped", "wall_s": 0.0, "note": "no time left (9 s)"}
    return data, parts


def test_pytest_counts_and_failing_names_from_junit(canned):
    data, _ = canned
    assert data["cuda_tests"] == {
        "source": "junit",
        "passed": 11,
        "failed": 1,
        "errors": 0,
        "skipped": 2,
        "failing": ["tests.test_cuda::test_compiled_blocks_match_eager_on_cuda"],
    }


def test_pytest_falls_back_to_the_summary_line_and_says_when_there_is_none(tmp_path):
    out = "..F.s\nFAILED tests/test_cuda.py::test_x - assert 1 == 2\n1 failed, 3 passed, 1 skipped, 700 deselected in 41.2s\n"
    got = gct.parse_pytest(out, tmp_path / "absent.xml")
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (3, 1, 1, 0)
    assert got["failing"] == ["tests/test_cuda.py::test_x"] and got["source"] == "summary line"
    stopped = gct.parse_pytest("..F..", None)  # killed before its summary
    assert stopped["passed"] is None and stopped["source"] == "none"


def test_memory_rows_prefer_the_final_json_and_drop_a_torn_line(canned, tmp_path):
    data, _ = canned
    assert [r["spec"] for r in data["memory_rows"]] == [
        "t2v-A14B:832*480:81:8",
        "i2v-A14B:832*480:81:8",
        "t2v-A14B:1280*720:81:16",
    ]
    assert data["memory_finished"] is False
    final = json.dumps({"device": "x", "rows": [{"spec": "s"}]})
    assert gct.memory_rows("log line\n" + final, tmp_path / "none.jsonl") == ([{"spec": "s"}], True)


def test_targets_on_canned_outputs(canned):
    data, parts = canned
    t = gct.evaluate(data, parts, small=False)
    assert t["cuda_tests"]["value"] == "11 passed, 1 failed, 2 skipped" and not t["cuda_tests"]["met"]
    assert t["cuda_tests"]["failing"] == ["tests.test_cuda::test_compiled_blocks_match_eager_on_cuda"]

    eager480 = t["dit_fraction_of_matmul/A14B 832x480x81/eager"]
    assert (eager480["value"], eager480["target"], eager480["met"]) == (0.66, 0.70, False)
    assert t["dit_fraction_of_matmul/A14B 1280x720x81/eager"]["met"] is True
    assert t["dit_fraction_of_matmul/A14B 832x480x81/compiled"]["met"] is True
    skipped = t["dit_fraction_of_matmul/A14B 1280x720x81/compiled"]
    assert skipped["value"] is None and not skipped["met"]
    assert skipped["note"] == "not measured: part speed_720p_compile skipped"

    stretch = t["stretch_t2v_a14b_480p_40_steps_magcache_denoise_s/eager"]
    assert stretch["value"] == pytest.approx(52 * 3.8) and not stretch["met"]
    compiled = t["stretch_t2v_a14b_480p_40_steps_magcache_denoise_s/compiled"]
    assert compiled["value"] == pytest.approx(52 * 2.85) and compiled["met"]

    label = "T2V-A14B 832x480x81 @ 8 GiB"
    assert t[f"peak_reserved_gib/{label}"]["value"] == 7.6 and t[f"peak_reserved_gib/{label}"]["met"]
    assert t[f"denoise_ratio/{label}"]["value"] == 1.04 and t[f"denoise_ratio/{label}"]["met"]
    assert t[f"denoise_ratio_full_depth_extrapolated/{label}"]["value"] == 1.05
    # the budget itself did not plan: not met, and the note says at what budget it ran
    i2v = t["peak_reserved_gib/I2V-A14B 832x480x81 @ 8 GiB"]
    assert i2v["value"] is None and not i2v["met"] and "minimum 8.45" in i2v["note"]
    hd = "T2V-A14B 1280x720x81 @ 16 GiB"
    assert t[f"peak_reserved_gib/{hd}"]["met"] and not t[f"denoise_ratio/{hd}"]["met"]
    ti2v = t["peak_reserved_gib/TI2V-5B 1280x704x121 @ 8 GiB"]
    assert ti2v["value"] is None and ti2v["note"] == "not measured: part memory timed out"
    assert "denoise_ratio/TI2V-5B 1280x704x121 @ 8 GiB" not in t  # no time target there

    # no flag: 1.4 s/step against 2 x (0.02 + 7 x 0.0939) s of bare forwards
    no_flag = t["no_flag_step_vs_bare_forwards/T2V-A14B 832x480x81"]
    assert no_flag["value"] == pytest.approx(round(1.4 / (2 * (0.02 + 7 * 0.0939)), 3)) and no_flag["met"]
    hd_no_flag = t["no_flag_step_vs_bare_forwards/T2V-A14B 1280x720x81"]
    assert hd_no_flag["value"] == pytest.approx(round(1.4 / (2 * (0.02 + 12 * 0.0939)), 3))
    assert t["auto_plan_keeps_everything_resident/T2V-A14B 832x480x81"]["met"]
    changed = t["auto_plan_keeps_everything_resident/T2V-A14B 1280x720x81"]
    assert not changed["met"] and changed["value"] == "fp32, MagCache: 38 of 40 resident, ..."
    assert all(set(v) >= {"value", "target", "met"} for v in t.values())


def test_nothing_measured_gives_unmet_targets_with_notes():
    parts = {"probe": {"status": "failed"}}
    t = gct.evaluate({}, parts, small=False)
    assert t and not any(v["met"] for v in t.values())
    assert all(v["value"] is None and v["note"].startswith("not measured") for v in t.values())
    assert t["auto_plan_keeps_everything_resident"]["note"] == "not measured: part probe failed"


def test_report_and_summary(canned, tmp_path, capsys):
    data, parts = canned
    args = gpu_check.argparse.Namespace(small=False, deadline=420)
    report = gpu_check.build_report(args, parts, data, started=gpu_check.time.monotonic())
    assert (report["device"], report["torch"]) == ("NVIDIA H100 80GB HBM3", "2.11.0+cu130")
    speed = report["figures"]["speed"]["A14B 832x480x81/eager"]
    assert speed["matmul_tflops"] == 796.0 and speed["by_backend"]["efficient"] == {
        "error": "No available kernel"
    }
    out = tmp_path / "r.json"
    gpu_check.write_json(out, report)
    assert json.loads(out.read_text())["targets"].keys() == report["targets"].keys()
    text = "\n".join(gct.summary_lines(report))
    assert "MISS dit_fraction_of_matmul/A14B 832x480x81/eager: 0.66 fraction (target >= 0.7)" in text
    assert "speed_720p_compile skipped" in text.replace("  ", " ").replace("  ", " ")
    assert "failing: tests.test_cuda::test_compiled_blocks_match_eager_on_cuda" in text


def test_memory_specs_round_trip_through_bench_memory():
    """The collector matches bench_memory's rows by their spec: the spelling must survive parsing."""
    import bench_memory

    for spec in (*gct.MEMORY_TARGETS, *gct.SMALL_MEMORY_TARGETS):
        assert bench_memory.Target.parse(spec).spec == spec


def test_parts_pass_the_targets_and_fit_the_deadline(tmp_path):
    parts = {p.name: p for p in gpu_check.plan_parts(False, "cuda", tmp_path, tmp_path / "ckpt")}
    memory = parts["memory"].argv
    specs = [memory[i + 1] for i, a in enumerate(memory) if a == "--target"]
    assert specs == list(gct.MEMORY_TARGETS)
    assert "--compile" in parts["speed_480p_compile"].argv and "--compile" not in parts["speed_480p"].argv
    assert "832x480x81" in parts["speed_480p"].argv and "1280x720x81" in parts["speed_720p"].argv
    # everything but the optional --compile parts (last: they run if time is left) is expected within the
    # deadline, with a margin
    names = list(parts)
    first_compile = next(i for i, name in enumerate(names) if name.endswith("_compile"))
    assert all(name.endswith("_compile") for name in names[first_compile:])
    assert "fp8_block_480p" in names and "--compile" in parts["fp8_block_720p_compile"].argv
    expected = sum(p.estimate_s for p in parts.values() if not p.name.endswith("_compile"))
    assert expected <= 0.95 * gpu_check.DEADLINE_S
    small = gpu_check.plan_parts(True, "cpu", tmp_path, tmp_path / "ckpt")
    assert all("--small" in p.argv for p in small if p.name != "cuda_tests")


def test_a_part_past_its_limit_is_stopped_and_a_failing_one_keeps_its_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_PART_S", 0.0)
    slow = gpu_check.Part("slow", ("-c", "import time; print('started', flush=True); time.sleep(60)"), 60, 1)
    record, out = gpu_check.run_part(slow, sys.executable, tmp_path, time_left=1.0)
    assert record["status"] == "timed out" and record["rc"] is None
    bad = gpu_check.Part("bad", ("-c", "import sys; print('{\"a\": 1}'); sys.exit('boom')"), 60, 1)
    record, out = gpu_check.run_part(bad, sys.executable, tmp_path, time_left=60.0)
    assert record["status"] == "failed" and record["rc"] == 1 and record["error_tail"] == ["boom"]
    assert gct.last_json(out) == {"a": 1}
    monkeypatch.setattr(gpu_check, "MIN_PART_S", 15.0)
    record, _ = gpu_check.run_part(bad, sys.executable, tmp_path, time_left=10.0)
    assert record["status"] == "skipped" and record["note"] == "no time left (10 s)"


def test_dry_run_rows_say_why_a_figure_is_missing():
    """CPU rows have no GPU peaks (but a ratio); a budget below every plan ran at the planner's minimum;
    a speed part whose auto backend failed says so."""
    rows = [
        memory_row("t2v-A14B:832*480:81:8", ratio=1.3, peaks={}),
        memory_row("i2v-A14B:832*480:81:0.5", ratio=1.0, peaks={}, note="ran at its minimum 6.55"),
    ]
    speed = gct.last_json(speed_output(0.5, 1.0))
    speed["results"][0] = {"attention": "auto", "error": "CUDA out of memory"}
    data = {"memory_rows": rows, "speed_480p": speed}
    parts = {"memory": {"status": "ok"}, "speed_480p": {"status": "ok"}}
    t = gct.evaluate(data, parts, small=True)
    label = "T2V-A14B 832x480 (small) @ 8 GiB simulated"
    assert t[f"peak_reserved_gib/{label}"]["note"] == "no GPU peaks (a CPU run)"
    assert t[f"denoise_ratio/{label}"]["value"] == 1.3 and "note" not in t[f"denoise_ratio/{label}"]
    low = "I2V-A14B 832x480 (small) @ 0.5 GiB simulated"
    assert t[f"denoise_ratio/{low}"]["note"] == "ran at its minimum 6.55"
    assert t[f"denoise_ratio/{low}"]["value"] is None
    eager = t["dit_fraction_of_matmul/A14B 832x480x81/eager"]
    assert eager["note"] == "not measured: attention auto failed: CUDA out of memory"
    assert t["no_flag_step_vs_bare_forwards/T2V-A14B 832x480 (small)"]["note"] == eager["note"]
    data["speed_480p"] = {**gct.last_json(speed_output(0.5, 1.0)), "preset": "small", "size": "64x64x9"}
    t = gct.evaluate(data, parts, small=True)
    assert t["no_flag_step_vs_bare_forwards/T2V-A14B 832x480 (small)"]["note"] == (
        "not comparable: speed_480p ran small 64x64x9, the memory run 832x480x81"
    )
    assert (
        t["dit_fraction_of_matmul/A14B 1280x720x81/eager"]["note"] == "not measured: part speed_720p not run"
    )


def test_part_outputs_go_to_one_log_file(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "LOG_TAIL_CHARS", 50)
    loud = gpu_check.Part(
        "loud", ("-c", "import sys; print('x' * 80 + 'END'); print('warn', file=sys.stderr)"), 60, 1
    )
    record, _ = gpu_check.run_part(loud, sys.executable, tmp_path, time_left=60.0)
    log = tmp_path / "gpu_check.log"
    gpu_check.append_log(log, "loud", record, tmp_path)
    text = log.read_text()
    assert text.startswith("===== loud: ok in ")
    assert "[... 34 characters left out ...]" in text and "xEND\n----- stderr\nwarn\n" in text


def cli_output(error: str | None = None) -> dict:
    def run(compile_s, denoise, diff):
        return {
            "rc": 0,
            "process_wall_s": 30.0 + (compile_s or 0),
            "timings_s": {"denoise": denoise},
            "compile_s": compile_s,
            "text_stage_s": {"tokenizer": 0.4, "encode": 0.2},
            "time_to_first_step": {"total_s": 12.5, "parts_s": {"startup": 1.0, "first_step": 2.0}},
            "max_abs_diff_vs_eager": diff,
        }

    runs = {
        "eager": run(None, 4.0, None),
        "compiled_cold": run(25.0, 3.0, 2),
        "compiled_warm": run(6.0, 3.0, 2),
    }
    if error:
        runs["compiled_cold"] = {"rc": 1, "process_wall_s": 9.0, "error": error}
    return {"runs": runs}


def test_rows_for_what_was_unmeasured_on_hardware():
    """The i2v encode peak, the eager block against the previous figure, batch-2 CFG, whether --compile
    repays itself, and the CLI runs (eager, compiled cold and warm, text stage, time to first step)."""
    cfgbatch = gct.last_json(speed_output(0.65, 3.3))
    cfgbatch["results"][0]["cfg_batch"] = {"batched_speedup": 1.08, "max_abs_diff": 0.002}
    data = {
        "probe": {"device": "NVIDIA H100 80GB HBM3"},
        "speed_480p": gct.last_json(speed_output(0.65, 3.3)),
        "speed_480p_compile": gct.last_json(speed_output(0.82, 2.6, compile_s=20.0)),
        "speed_480p_cfgbatch": cfgbatch,
        "memory_rows": [
            memory_row("i2v-A14B:832*480:81:8", ratio=1.0, peaks={"encode_image": 7.5, "denoise": 7.3})
        ],
        "cli_compile": cli_output(),
    }
    names = ("probe", "speed_480p", "speed_480p_compile", "speed_480p_cfgbatch", "memory", "cli_compile")
    parts = {name: {"status": "ok"} for name in names}
    t = gct.evaluate(data, parts, small=False)
    rope = t["eager_block_vs_previous/A14B 832x480x81"]
    assert rope["value"] == round(0.0939 / 0.0823, 3) and not rope["met"]
    assert t["eager_block_vs_previous/A14B 1280x720x81"]["note"] == "not measured: part speed_720p not run"
    assert (
        t["cfg_batch_speedup/A14B 832x480x81"]["value"] == 1.08
        and t["cfg_batch_speedup/A14B 832x480x81"]["met"]
    )
    encode = t["i2v_encode_peak_reserved_gib/I2V-A14B 832x480x81 @ 8 GiB"]
    assert encode["value"] == 7.5 and encode["met"]
    repays = t["compile_repays_t2v_a14b_480p_40_steps_magcache_s"]
    assert repays["value"] == pytest.approx(52 * (3.3 - 2.6) - 20.0) and repays["met"]
    assert repays["rule_figures"]["measured_compile_s"] == 20.0
    assert t["cli_compile_runs"]["value"] == "ok" and t["cli_compile_runs"]["met"]

    report = {"parts": parts, "targets": t, "figures": {"cli": gct.cli_figures(data)}}
    text = "\n".join(gct.summary_lines(report))
    assert "CLI compiled_warm: 36 s process, compile 6 s" in text
    assert "first step at 12.5 s (startup 1, first_step 2); text stage: tokenizer 0.4, encode 0.2" in text

    data["speed_480p"]["device"] = "NVIDIA A100-SXM4-80GB"
    data["cli_compile"] = cli_output(error="RuntimeError: inductor failed")
    t = gct.evaluate(data, parts, small=False)
    assert t["eager_block_vs_previous/A14B 832x480x81"]["note"].startswith("not comparable: the previous")
    assert t["cli_compile_runs"]["value"] == "compiled_cold: RuntimeError: inductor failed"
    assert not t["cli_compile_runs"]["met"]
    assert gct.cli_figures(data)["compiled_cold"] == {"error": "RuntimeError: inductor failed"}


def test_the_cli_part_runs_the_cli_check(tmp_path):
    parts = {p.name: p for p in gpu_check.plan_parts(False, "cuda", tmp_path, tmp_path / "ckpt")}
    assert (
        parts["cli_compile"].argv[0] == "benchmarks/cli_check.py"
        and "--small" not in parts["cli_compile"].argv
    )
    small = {p.name: p for p in gpu_check.plan_parts(True, "cpu", tmp_path, tmp_path / "ckpt")}
    assert "--small" in small["cli_compile"].argv
