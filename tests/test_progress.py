"""Run output in a terminal, a pipe and a log file: no folded lines, plain tables off a terminal,
transient progress bars, and one rounding rule for every speedup figure."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from magcache_generate.batch import BatchRow
from magcache_generate.magcache.plan import Plan
from magcache_generate.magcache.report import format_speedup, plan_json, render_plan, round_speedup
from magcache_generate.magcache.settings import make_plan
from magcache_generate.progress import Reporter, make_console, print_batch, print_result, summary_rows
from magcache_generate.request import MagCacheOptions
from wan.schedule import make_schedule

LONG = (
    "/data/"
    + "very_long_folder_name_" * 8
    + "/t2v-A14B_1280x720_1_Two_anthropomorphic_cats_20250728_123456.mp4"
)

RESULT = {
    "task": "t2v-A14B",
    "seed": 7,
    "save_file": LONG,
    "timings_s": {"encode_text": 1.5, "denoise": 8.0, "decode": 2.25},
    "steps_run": 4,
    "peak_memory": {"host_rss_gib": 1.0, "gpu_allocated_gib": None},
    "request": {"sidecar": True},
    "total_s": 12.34,
    "magcache": {
        "mode": "aligned",
        "calls": [{"expert": "high", "branch": "cond", "computed": 3, "skipped": 1}],
        "forwards": 3,
        "dense_forwards": 4,
        "ideal_speedup": 1.333,
        "estimated_speedup": 1.29,
    },
}


def plain_output(print_fn, *args) -> str:
    buffer = io.StringIO()
    console = make_console(buffer)
    assert not console.is_terminal
    print_fn(console, *args)
    return buffer.getvalue()


def test_plain_output_keeps_paths_whole_and_says_where_everything_went():
    out = plain_output(print_result, RESULT)
    lines = out.splitlines()
    assert lines[0] == "t2v-A14B  seed 7"  # compact title: no path in it
    assert f"video:   {LONG}" in lines
    assert f"sidecar: {LONG[:-4]}.json" in lines
    assert "total:   12.3 s" in lines
    assert "ideal speedup 1.333x, estimated 1.290x (model, not measured)" in lines
    assert not any(ch in out for ch in "┏┃━│└")  # no box drawing in a log file
    assert all(line == line.rstrip() for line in lines)


def test_terminal_output_does_not_fold_paths():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=40, soft_wrap=True, color_system=None)
    print_result(console, RESULT)
    out = buffer.getvalue()
    assert LONG in out  # one piece: the terminal wraps it, nothing inserts newlines into it
    assert "┏" in out  # tables drawn as tables


def test_extra_summary_rows_are_shown():
    rows = summary_rows({**RESULT, "summary_rows": [("peak GPU in decode (GiB)", "3.10")]})
    assert rows[-1] == ("peak GPU in decode (GiB)", "3.10")
    assert ("s/step", "2.000") in rows


def test_batch_closing_lines():
    rows = [
        BatchRow(1, 1, "ok", seed=3, seconds=2.5, output="a_001.mp4"),
        BatchRow(2, 2, "skipped", reason="not valid JSON [col 3]"),
        BatchRow(3, 4, "failed", seed=4, seconds=0.5, output="a_003.mp4", reason="boom"),
    ]
    out = plain_output(print_batch, rows, 9.0)
    lines = out.splitlines()
    assert lines[0] == "batch"
    assert lines[2].split() == ["001", "1", "ok", "3", "2.5", "a_001.mp4"]
    assert lines[3].split(None, 3) == ["002", "2", "skipped", "not valid JSON [col 3]"]  # no markup eaten
    assert lines[4].split() == ["003", "4", "failed", "4", "0.5", "boom"]
    assert lines[5] == "batch: 3 item(s), 1 ok, 1 skipped, 1 failed; total 9.0 s"


def test_progress_bars_leave_when_done():
    console = Console(file=io.StringIO(), force_terminal=True, width=80)
    with Reporter(console) as reporter:
        assert reporter.progress.live.transient
        loading = reporter.task("loading", total=2)
        reporter.advance(loading)
        assert len(reporter.progress.tasks) == 1
        reporter.advance(loading)
        assert reporter.progress.tasks == []  # a finished bar leaves the display
        with reporter.stage("decoding"):
            assert len(reporter.progress.tasks) == 1
        assert reporter.progress.tasks == []
        reporter.advance(loading)  # late updates of a finished bar are ignored
        reporter.finish(loading)


def plan_for(task: str, steps: int, **options) -> Plan:
    schedule = make_schedule("unipc", steps, 12.0 if task == "t2v-A14B" else 5.0)
    timesteps = [int(t) for t in schedule.timesteps[: len(schedule)]]
    return make_plan(
        task, timesteps, 12.0, MagCacheOptions(enabled=True, **options), False, log=lambda _: None
    )


@pytest.mark.parametrize(
    ("task", "steps"), [("t2v-A14B", 8), ("t2v-A14B", 40), ("i2v-A14B", 40), ("ti2v-5B", 50)]
)
def test_every_speedup_figure_has_the_same_digits(task, steps):
    p = plan_for(task, steps)
    shown = format_speedup(p.ideal_speedup)
    assert f"ideal speedup {shown}" in render_plan(p)  # --magcache-plan and the run log
    stored = round_speedup(p.ideal_speedup)  # sidecar and --json
    assert format_speedup(stored) == shown  # the summary formats the stored value
    assert json.loads(json.dumps(stored)) == stored


def test_rounding_is_idempotent_at_the_edges():
    for value in (1.4545454545, 1.4545, 1.0005, 2.0, 1.23449999, 16 / 11):
        assert format_speedup(round_speedup(value)) == format_speedup(value)
    assert round_speedup(float("inf")) is None and format_speedup(None) == "n/a"
    assert format_speedup(16 / 11) == "1.455x"  # the 8-step demo plan: 16 dense / 11 computed


def test_plan_json_keys_unchanged():
    assert set(plan_json(plan_for("t2v-A14B", 8))) == {
        "task",
        "steps",
        "mode",
        "forwards",
        "dense_forwards",
        "calls",
    }


def test_warnings_are_in_the_plan_once():
    p = plan_for("t2v-A14B", 8, mode="official")  # aligned mode plans 8 steps without a warning
    text = render_plan(p)
    assert p.warnings
    for warning in p.warnings:
        assert text.count(warning) == 1
