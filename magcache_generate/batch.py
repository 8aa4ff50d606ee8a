"""``--prompt-file``: many generations from one command, with the models loaded once.

The file holds one item per line, in either form (they may be mixed):

* a plain prompt; blank lines and lines starting with ``#`` are skipped;
* a JSON object (JSON Lines) with ``prompt`` and optional per-item overrides of the command-line
  options: ``seed`` (or ``base_seed``), ``image``, ``save_file``, ``negative_prompt``, ``size``,
  ``frame_num``, ``sample_steps``, ``sample_shift``, ``sample_guide_scale``. Keys may use ``-`` or ``_``.

Relative paths in the file are resolved against the current folder, as on the command line. A bad
item is reported with its line number and skipped; the others still run. Items are numbered 1, 2, ...
in file order, bad ones included, and default output names carry that number (``..._003.mp4``), as
does the closing table, which lists every item as ok, skipped or failed. The exit code is 0 only when
every item was generated, else ``EXIT_PARTIAL`` (2 stays "nothing was run").

With ``--magcache-calibrate`` the items are dense calibration runs averaged into one file, so they must
be like runs: ``check_calibration_batch`` skips items whose size, frames, steps, shift, guide scale or
image use differ from the first one's.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magcache_generate.request import Request, UserError
from magcache_generate.validate import GenerateOptions, build_request

if TYPE_CHECKING:
    from magcache_generate.magcache.plan import Plan

# JSON key -> GenerateOptions field, and the JSON types each accepts.
OVERRIDE_FIELDS: dict[str, str] = {
    "prompt": "prompt",
    "seed": "base_seed",
    "base_seed": "base_seed",
    "image": "image",
    "save_file": "save_file",
    "negative_prompt": "negative_prompt",
    "size": "size",
    "frame_num": "frame_num",
    "sample_steps": "sample_steps",
    "sample_shift": "sample_shift",
    "sample_guide_scale": "sample_guide_scale",
}
PATH_FIELDS = frozenset({"image", "save_file"})
TEXT_FIELDS = frozenset({"prompt", "negative_prompt", "size"})
INT_FIELDS = frozenset({"base_seed", "frame_num", "sample_steps"})
EXIT_PARTIAL = 3  # a batch ran, but some items were skipped (bad line) or failed


@dataclass(frozen=True)
class BatchItem:
    """One usable line: its line number, the options it overrides (``prompt`` always among them) and its
    item number (1-based, counting every item line, bad ones too)."""

    line: int
    overrides: dict[str, Any]
    number: int = 0


@dataclass(frozen=True)
class BatchProblem:
    line: int
    message: str
    number: int = 0  # item number, as BatchItem.number

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class BatchEntry:
    line: int
    request: Request
    random_seed: bool  # the seed was drawn at random (printed so the item can be repeated)
    number: int = 0  # item number, as BatchItem.number
    magcache: Plan | None = None  # the item's MagCache plan, once checked (the command does, before loading)


@dataclass(frozen=True)
class BatchRow:
    """One item of the closing table."""

    number: int
    line: int
    status: str  # "ok" | "skipped" | "failed" | "not run"
    seed: int | None = None
    seconds: float | None = None
    output: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Batch:
    entries: list[BatchEntry]
    problems: list[BatchProblem]


def parse_prompt_file(path: Path) -> tuple[list[BatchItem], list[BatchProblem]]:
    """Items and per-line problems of a prompt file; an unreadable or empty file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise UserError(f"--prompt-file '{path}' {what}; pass a text file with one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM written by Windows editors
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--prompt-file '{path}' cannot be read as UTF-8 text ({err})") from None
    items: list[BatchItem] = []
    problems: list[BatchProblem] = []
    item_number = 0
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        item_number += 1
        try:
            overrides = _parse_json_item(line) if line.startswith("{") else {"prompt": line}
        except UserError as err:
            problems.append(BatchProblem(line_number, str(err), item_number))
            continue
        items.append(BatchItem(line_number, overrides, item_number))
    if not items and not problems:
        raise UserError(f"--prompt-file '{path}' holds no prompts (blank lines and # comments are skipped)")
    return items, problems


def _parse_json_item(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(
            f"not valid JSON ({err.msg} at column {err.colno}); write one object per line"
        ) from None
    if not isinstance(data, dict):
        raise UserError('expected a JSON object such as {"prompt": "..."}')
    overrides: dict[str, Any] = {}
    for key, value in data.items():
        field = OVERRIDE_FIELDS.get(key.replace("-", "_"))
        if field is None:
            raise UserError(f"unknown key {key!r}; known keys: {', '.join(OVERRIDE_FIELDS)}")
        if field in overrides:
            raise UserError(f"key {key!r} repeats a setting given on the same line")
        overrides[field] = _checked_value(key, field, value)
    if "prompt" not in overrides:
        raise UserError('no "prompt" key; every item needs a prompt')
    if not overrides["prompt"].strip():
        raise UserError("the prompt is empty")
    return overrides


def _checked_value(key: str, field: str, value: Any) -> Any:
    if field in TEXT_FIELDS or field in PATH_FIELDS:
        if not isinstance(value, str):
            raise UserError(f"{key!r} must be a string, got {json.dumps(value)}")
        return Path(value) if field in PATH_FIELDS else value
    if field in INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key!r} must be an integer, got {json.dumps(value)}")
        return value
    if field == "sample_shift":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key!r} must be a number, got {json.dumps(value)}")
        return float(value)
    # sample_guide_scale: a number, a list of one or two numbers, or a string such as "3.0,4.0"
    ok_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok_list = isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
    if not (ok_number or ok_list or isinstance(value, str)):
        raise UserError(f"{key!r} must be a number or a list of two numbers, got {json.dumps(value)}")
    return tuple(value) if ok_list else value


def build_batch(
    base: GenerateOptions,
    path: Path,
    *,
    now: datetime | None = None,
    rng: random.Random | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Batch:
    """One ``Request`` per valid line of the prompt file, ``base`` supplying everything an item omits.

    The checkpoint is not checked here (once per batch, by the caller). Items whose outputs collide
    with an earlier item's are reported like any other bad item.
    """
    items, problems = parse_prompt_file(path)
    now = now or datetime.now()
    entries: list[BatchEntry] = []
    owners: dict[Path, str] = {}  # output path -> who writes it
    if base.magcache_calibrate is not None:  # one file for the whole batch
        owners[Path(base.magcache_calibrate).resolve()] = "--magcache-calibrate"
    for item in items:
        options = dataclasses.replace(base, **item.overrides)
        try:
            request = build_request(
                options, now=now, item_index=item.number, check_checkpoint=False, rng=rng, defaults=defaults
            )
            _claim_outputs(request, f"line {item.line}", owners)
        except UserError as err:
            problems.append(BatchProblem(item.line, str(err), item.number))
            continue
        entries.append(BatchEntry(item.line, request, options.base_seed == -1, item.number))
    if base.magcache_calibrate is not None:
        entries, mismatched = check_calibration_batch(entries)
        problems += mismatched
    problems.sort(key=lambda p: p.line)
    return Batch(entries, problems)


def _claim_outputs(request: Request, owner: str, owners: dict[Path, str]) -> None:
    outputs = [request.save_file, request.sidecar_file, request.save_frames]
    outputs.append(request.dense_save_file)
    paths = [p.resolve() for p in outputs if p is not None]
    for path in paths:
        if path in owners:
            raise UserError(f"'{path}' is also written by {owners[path]}; give each item its own save_file")
    for path in paths:
        owners[path] = owner


# What makes two calibration runs alike enough to average (Request fields, and how a line sets them).
CALIBRATION_FIELDS = {
    "size": "size",
    "frame_num": "frame_num",
    "sample_steps": "sample_steps",
    "sample_shift": "sample_shift",
    "guide_scale": "sample_guide_scale",
}


def check_calibration_batch(entries: list[BatchEntry]) -> tuple[list[BatchEntry], list[BatchProblem]]:
    """Keep the items that are like the first one (a calibration averages like runs); the others become
    problems naming the setting that differs."""
    if not entries:
        return entries, []
    first = entries[0]
    kept, problems = [first], []
    for entry in entries[1:]:
        differs = [
            key
            for field, key in CALIBRATION_FIELDS.items()
            if getattr(entry.request, field) != getattr(first.request, field)
        ]
        if (entry.request.image is None) != (first.request.image is None):
            differs.append("image")
        if differs:
            problems.append(
                BatchProblem(
                    entry.line,
                    f"{differs[0]} differs from line {first.line}'s; --magcache-calibrate averages like runs, "
                    "so every item needs the same size, frame_num, sample_steps, sample_shift, "
                    "sample_guide_scale and image use",
                    entry.number,
                )
            )
        else:
            kept.append(entry)
    return kept, problems


def batch_rows(
    entries: list[BatchEntry], problems: list[BatchProblem], results: list[dict]
) -> list[BatchRow]:
    """Every item in file order: skipped ones from ``problems``, the others from their run ``results``
    (one per entry, in order; a result with ``error`` is a failed item, one with ``not_run`` was not
    started: an earlier item left the device unusable)."""
    rows = [BatchRow(p.number, p.line, "skipped", reason=p.message) for p in problems]
    for entry, result in zip(entries, results, strict=True):
        error = result.get("error")
        rows.append(
            BatchRow(
                entry.number,
                entry.line,
                "not run" if result.get("not_run") else "failed" if error else "ok",
                seed=entry.request.base_seed,
                seconds=result.get("total_s"),
                output=str(entry.request.save_file),
                reason=error,
            )
        )
    return sorted(rows, key=lambda r: r.line)


def batch_exit_code(rows: list[BatchRow]) -> int:
    return 0 if all(r.status == "ok" for r in rows) else EXIT_PARTIAL
