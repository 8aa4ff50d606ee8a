"""``--prompt-file``: many generations from one command, with the models loaded once.

The file holds one item per line, in either form (they may be mixed):

* a plain prompt; blank lines and lines starting with ``#`` are skipped;
* a JSON object (JSON Lines) with ``prompt`` and optional per-item overrides of the command-line
  options: ``seed`` (or ``base_seed``), ``image``, ``save_file``, ``negative_prompt``, ``size``,
  ``frame_num``, ``sample_steps``, ``sample_shift``, ``sample_guide_scale``. Keys may use ``-`` or ``_``.

Relative paths in the file are resolved against the current folder, as on the command line. A bad
item is reported with its line number and skipped; the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from magcache_generate.request import Request, UserError
from magcache_generate.validate import GenerateOptions, build_request

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


@dataclass(frozen=True)
class BatchItem:
    """One usable line: its number (1-based) and the options it overrides (``prompt`` always among them)."""

    line: int
    overrides: dict[str, Any]


@dataclass(frozen=True)
class BatchProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class BatchEntry:
    line: int
    request: Request
    random_seed: bool  # the seed was drawn at random (printed so the item can be repeated)


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
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            overrides = _parse_json_item(line) if line.startswith("{") else {"prompt": line}
        except UserError as err:
            problems.append(BatchProblem(number, str(err)))
            continue
        items.append(BatchItem(number, overrides))
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
) -> Batch:
    """One ``Request`` per valid line of the prompt file, ``base`` supplying everything an item omits.

    The checkpoint is not checked here (once per batch, by the caller). Items whose outputs collide
    with an earlier item's are reported like any other bad item.
    """
    items, problems = parse_prompt_file(path)
    now = now or datetime.now()
    entries: list[BatchEntry] = []
    owners: dict[Path, int] = {}  # output path -> line that writes it
    for position, item in enumerate(items, start=1):
        options = dataclasses.replace(base, **item.overrides)
        try:
            request = build_request(options, now=now, item_index=position, check_checkpoint=False, rng=rng)
            _claim_outputs(request, item.line, owners)
        except UserError as err:
            problems.append(BatchProblem(item.line, str(err)))
            continue
        entries.append(BatchEntry(item.line, request, options.base_seed == -1))
    problems.sort(key=lambda p: p.line)
    return Batch(entries, problems)


def _claim_outputs(request: Request, line: int, owners: dict[Path, int]) -> None:
    outputs = [request.save_file, request.sidecar_file, request.save_frames, request.magcache.calibrate_file]
    outputs.append(request.dense_save_file)
    paths = [p.resolve() for p in outputs if p is not None]
    for path in paths:
        if path in owners:
            raise UserError(
                f"'{path}' is also written by line {owners[path]}; give each item its own save_file"
            )
    for path in paths:
        owners[path] = line
