"""Rich progress display and end-of-run tables. No tensor code."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


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
            TimeRemainingColumn(),
            console=console,
            transient=False,
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
        self.progress.update(task_id, advance=amount, detail=detail)

    def finish(self, task_id: int, detail: str = "") -> None:
        total = self.progress.tasks[self._index(task_id)].total or 1
        self.progress.update(task_id, completed=total, total=total, detail=detail)

    def _index(self, task_id: int) -> int:
        return next(i for i, t in enumerate(self.progress.tasks) if t.id == task_id)

    @contextmanager
    def stage(self, description: str):
        task_id = self.task(description, total=1)
        yield task_id
        self.finish(task_id)

    def log(self, message: str) -> None:
        self.console.print(message)


def summary_table(result: dict) -> Table:
    table = Table(
        title=f"{result['task']}  seed {result['seed']}  ->  {result.get('save_file')}", show_header=True
    )
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in result["timings_s"].items():
        table.add_row(stage, f"{seconds:.2f}")
    steps = result.get("steps_run") or 0
    if steps:
        table.add_row("s/step", f"{result['timings_s'].get('denoise', 0.0) / steps:.3f}")
    for label, value in memory_rows(result["peak_memory"]):
        table.add_row(label, value)
    return table


def memory_rows(mem: dict) -> list[tuple[str, str]]:
    """Summary rows for the sidecar's `peak_memory`: host RSS of the item (or the process, where the
    peak cannot be reset), then GPU peak reserved / allocated per stage."""
    scope = "this item" if str(mem.get("host_rss_scope", "")).startswith("item") else "process"
    rows = [(f"peak host RSS, {scope} (GiB)", f"{mem['host_rss_gib']:.2f}")]
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


def magcache_table(report: dict) -> Table:
    table = Table(title=f"MagCache ({report['mode']} mode)")
    for column in ("expert", "branch", "computed", "skipped"):
        table.add_column(column, justify="right" if column in ("computed", "skipped") else "left")
    for row in report["calls"]:
        table.add_row(row["expert"], row["branch"], str(row["computed"]), str(row["skipped"]))
    table.add_row("all", "", str(report["forwards"]), str(report["dense_forwards"] - report["forwards"]))
    table.caption = f"ideal speedup {report['ideal_speedup']:.3f}x" + (
        f", measured {report['measured_speedup']:.3f}x" if report.get("measured_speedup") else ""
    )
    return table


def batch_table(results: list[dict]) -> Table:
    table = Table(title="batch")
    for column in ("#", "status", "seed", "seconds", "output / error"):
        table.add_column(column)
    for i, r in enumerate(results):
        ok = r.get("error") is None
        table.add_row(
            str(i),
            "ok" if ok else "[red]failed",
            str(r.get("seed", "")),
            f"{r.get('total_s', 0.0):.1f}",
            str(r.get("save_file")) if ok else r["error"],
        )
    return table
