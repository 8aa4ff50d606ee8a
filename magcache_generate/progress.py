"""What a run prints: progress bars while it works, then each video's summary, its MagCache counts and
the closing batch table. No tensor code.

The output reads well in a terminal, a pipe and a log file alike:

* nothing is hard-wrapped: long lines and paths stay whole (a terminal wraps them itself), because
  the console soft-wraps and, outside a terminal, is wide enough that tables never fold;
* outside a terminal tables are plain aligned columns (no box drawing) and there are no progress bars;
* in a terminal each progress bar disappears once its stage is done and the rest are cleared when the
  run ends, so nothing prints twice;
* every speedup shows ``format_speedup``'s digits, the ones the plan and the sidecar use.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from magcache_generate.cfg_batching import summary_text as cfg_batch_summary
from magcache_generate.compile_choice import summary_text as compile_summary
from magcache_generate.magcache.report import format_speedup
from magcache_generate.naming import sidecar_path
from magcache_generate.quality import summary_line
from magcache_generate.startup import summary_rows as startup_rows

if TYPE_CHECKING:
    from magcache_generate.batch import BatchRow

PLAIN_WIDTH = 100_000  # outside a terminal: wide enough that rich never folds a line


def make_console(file: IO[str] | None = None) -> Console:
    """The run's console (stdout by default): soft-wrapped, and without a width limit when not a terminal."""
    console = Console(file=file, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(file=file, highlight=False, soft_wrap=True, width=PLAIN_WIDTH)
    return console


class StepEtaColumn(ProgressColumn):
    """Time left from the average step so far: shown once one step has finished (rich's own column
    needs two updates within 30 s, which minute-long CPU steps never give)."""

    def render(self, task: Task) -> Text:
        if not task.total or not task.completed or task.elapsed is None or task.finished:
            return Text("-:--:--", style="progress.remaining")
        left = task.elapsed / task.completed * (task.total - task.completed)
        return Text(eta_text(left), style="progress.remaining")


def eta_text(seconds: float) -> str:
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Reporter:
    """One rich Progress shared by the stages of a run (loading, text, denoising, decode, writing)."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            StepEtaColumn(),
            console=console,
            transient=True,  # cleared when the run ends: the summary says what happened
            disable=not console.is_terminal,
        )

    def __enter__(self) -> Reporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def task(self, description: str, total: int | None = None) -> int:
        return self.progress.add_task(description, total=total, detail="")

    def advance(self, task_id: int, detail: str = "", amount: float = 1) -> None:
        if self._task(task_id) is None:
            return
        self.progress.update(task_id, advance=amount, detail=detail)
        self._drop_if_finished(task_id)

    def finish(self, task_id: int, detail: str = "") -> None:
        task = self._task(task_id)
        if task is None:
            return
        total = task.total or 1
        self.progress.update(task_id, completed=total, total=total, detail=detail)
        self._drop_if_finished(task_id)

    def _task(self, task_id: int):
        return next((t for t in self.progress.tasks if t.id == task_id), None)

    def _drop_if_finished(self, task_id: int) -> None:
        task = self._task(task_id)
        if task is not None and task.finished:
            self.progress.remove_task(task_id)  # a finished bar leaves the display

    @contextmanager
    def stage(self, description: str) -> Iterator[int]:
        task_id = self.task(description, total=1)
        yield task_id
        self.finish(task_id)

    def log(self, message: str) -> None:
        print_message(self.console, message)


PIPE_WIDTH = 100  # outside a terminal a message line is wrapped at spaces to this many columns


def print_message(console: Console, message: str, *, markup: bool = True) -> None:
    """A (rich markup) message: as is in a terminal (which wraps it); in a pipe or a log, plain lines of
    at most PIPE_WIDTH columns, wrapped at spaces (a continuation indented two more), so no word (or
    path) is cut."""
    if console.is_terminal:
        console.print(message, markup=markup)
        return
    plain = Text.from_markup(message).plain if markup else message
    for line in plain.splitlines() or [""]:
        indent = " " * (len(line) - len(line.lstrip()) + 2)
        wrapped = textwrap.wrap(
            line, PIPE_WIDTH, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
        )
        for part in wrapped or [line]:
            console.print(part, markup=False)


def _table(console: Console, title: str | None = None) -> Table:
    if console.is_terminal:
        return Table(title=title, title_justify="left", box=box.HEAVY_HEAD)
    return Table(title=title, title_justify="left", box=None, pad_edge=False, padding=(0, 2))


def print_table(console: Console, table: Table) -> None:
    """A table as rich draws it in a terminal; elsewhere its plain lines without trailing padding."""
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        console.print(line.rstrip(), markup=False)


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """(label, value) rows of one video's summary: stage times, s/step, peak memory, then any rows a
    stage added under ``result["summary_rows"]`` (e.g. per-stage memory)."""
    rows = [(stage, f"{seconds:.2f}") for stage, seconds in result["timings_s"].items()]
    steps = result.get("steps_run") or 0
    if steps:
        rows.append(("s/step", f"{result['timings_s'].get('denoise', 0.0) / steps:.3f}"))
    calls = result.get("sampling", {}).get("dit_calls_by_branch")
    if calls:
        only = " (cond only: guide scale 1)" if not calls.get("uncond") else ""
        rows.append(("DiT calls", f"{sum(calls.values())}{only}"))
    if result.get("cfg_batch"):
        rows.append(("CFG batch", cfg_batch_summary(result["cfg_batch"])))
    if result.get("compile"):
        rows.append(("compile", compile_summary(result["compile"])))
    rows += memory_rows(result["peak_memory"])
    if result.get("attention"):
        attention = result["attention"]
        rows.append(("attention", f"{attention['actual']} (asked: {attention['requested']})"))
    if result.get("weights"):  # the DiT's storage precision (fp8 block Linears with --quantize fp8)
        rows.append(("DiT weights", result["weights"]))
    rows += startup_rows(result)
    rows += [(str(label), str(value)) for label, value in result.get("summary_rows", ())]
    return rows


# A summary value longer than this is a sentence, not a figure: it goes below the table as its own line
# (in the table it would pad every row of the right-aligned column to its width).
TABLE_VALUE_WIDTH = 16


def summary_table(result: dict, console: Console | None = None) -> Table:
    table = _table(console or make_console(), f"{result['task']}  seed {result['seed']}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for label, value in summary_rows(result):
        if len(value) <= TABLE_VALUE_WIDTH:
            table.add_row(label, value)
    return table


def summary_notes(result: dict) -> list[str]:
    """The summary rows whose value is a sentence, as `label: value` lines."""
    return [f"{label}: {value}" for label, value in summary_rows(result) if len(value) > TABLE_VALUE_WIDTH]


def memory_rows(mem: dict) -> list[tuple[str, str]]:
    """Summary rows for the sidecar's `peak_memory`: host pressure (anonymous + pinned) with the
    file-backed part apart, host RSS of the item (or the process, where the peak cannot be reset), then GPU peak reserved / allocated per stage."""
    scope = "this item" if str(mem.get("host_rss_scope", "")).startswith("item") else "process"
    rows = []
    if mem.get("host_pressure_gib") is not None:
        rows.append(("peak host memory, anonymous + pinned (GiB)", f"{mem['host_pressure_gib']:.2f}"))
        rows.append(("  file-backed, reclaimable (GiB)", f"{mem['host_file_backed_gib']:.2f}"))
    rows.append((f"peak host RSS, {scope} (GiB)", f"{mem['host_rss_gib']:.2f}"))
    stages = mem.get("stages") or {}
    for stage, peaks in stages.items():
        rows.append(
            (
                f"GPU {stage}: reserved / allocated (GiB)",
                f"{peaks['gpu_reserved_gib']:.2f} / {peaks['gpu_allocated_gib']:.2f}",
            )
        )
    if not stages and mem.get("gpu_allocated_gib") is not None:
        rows.append(("peak GPU allocated (GiB)", f"{mem['gpu_allocated_gib']:.2f}"))
    return rows


def magcache_table(report: dict, console: Console | None = None) -> Table:
    table = _table(console or make_console(), f"MagCache ({report['mode']} mode)")
    for column in ("expert", "branch", "computed", "skipped"):
        table.add_column(column, justify="right" if column in ("computed", "skipped") else "left")
    for row in report["calls"]:
        table.add_row(row["expert"], row["branch"], str(row["computed"]), str(row["skipped"]))
    table.add_row("all", "", str(report["forwards"]), str(report["dense_forwards"] - report["forwards"]))
    table.caption = magcache_caption(report)
    table.caption_justify = "left"
    return table


def magcache_caption(report: dict) -> str:
    """Ideal (from the plan), estimated (a model) and, with --magcache-verify, measured speedup and quality."""
    parts = [f"ideal speedup {format_speedup(report['ideal_speedup'])}"]
    if report.get("estimated_speedup"):
        parts.append(f"estimated {format_speedup(report['estimated_speedup'])} (model, not measured)")
    verify = report.get("verify")
    if not verify:
        return ", ".join(parts)
    if verify.get("measured_speedup"):
        parts.append(
            f"measured {format_speedup(verify['measured_speedup'])} (dense {verify['dense_denoise_s']:.2f} s / "
            f"MagCache {verify['magcache_denoise_s']:.2f} s)"
        )
    lines = [", ".join(parts), f"vs dense {verify['dense_file']}: {summary_line(verify['quality_vs_dense'])}"]
    return "\n".join(lines)


def print_result(console: Console, result: dict) -> None:
    """One finished video: its summary, MagCache counts, where it went and how long it took in all."""
    print_table(console, summary_table(result, console))
    for note in summary_notes(result):
        print_message(console, note, markup=False)
    report = result.get("magcache")
    if report and report.get("calls"):
        print_table(console, magcache_table(report, console))
    lines = [("video", result.get("save_file"))]
    if result.get("request", {}).get("sidecar", True) and result.get("save_file"):
        lines.append(("sidecar", str(sidecar_path(result["save_file"]))))
    if result.get("total_s") is not None:
        lines.append(("total", f"{result['total_s']:.1f} s"))
    for label, value in lines:
        console.print(f"{label + ':':<9}{value}", markup=False)


def batch_table(rows: Sequence[BatchRow], console: Console | None = None) -> Table:
    """Every item line of the prompt file, numbered as the default output names are (001, 002, ...)."""
    table = _table(console or make_console(), "batch")
    for column in ("#", "line", "status", "seed", "seconds", "output / reason"):
        table.add_column(column, justify="right" if column in ("line", "seconds") else "left")
    style = {"ok": "green", "skipped": "yellow", "failed": "red", "not run": "red"}
    for row in rows:
        table.add_row(
            f"{row.number:03d}",
            str(row.line),
            Text(row.status, style=style[row.status]),
            "" if row.seed is None else str(row.seed),
            "" if row.seconds is None else f"{row.seconds:.1f}",
            Text((row.output if row.status == "ok" else row.reason) or ""),  # Text: no markup in paths
        )
    return table


def print_batch(console: Console, rows: Sequence[BatchRow], seconds: float) -> None:
    print_table(console, batch_table(rows, console))
    statuses = ("ok", "skipped", "failed", "not run")
    counts = {status: sum(r.status == status for r in rows) for status in statuses}
    not_run = f", {counts['not run']} not run" if counts["not run"] else ""
    console.print(
        f"batch: {len(rows)} item(s), {counts['ok']} ok, {counts['skipped']} skipped, "
        f"{counts['failed']} failed{not_run}; total {seconds:.1f} s",
        markup=False,
    )
