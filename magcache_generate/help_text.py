"""`--help` as plain text for pipes, logs and narrow terminals: no box drawing, at most 80 columns, every
option name whole (its own line), options grouped by panel, the subcommands listed.

Read from the click command itself (names, metavars, help, defaults, panels), so an option added to the
command appears here without a second list.
"""

from __future__ import annotations

import textwrap
import typing
from enum import Enum
from pathlib import Path
from typing import Any

WIDTH = 80
INDENT = 6
COMMANDS = (
    ("compare A B", "PSNR and SSIM of video B against video A (compare --help)"),
    ("convert SRC OUT", "one DiT to one file: fp8, bf16 or fp16 (convert --help)"),
)
OTHER_PANEL = "General"
UPSTREAM_NOTE = "Upstream generate.py spellings (--frame_num 81, --offload_model True, ...) are accepted too."


def _names(param: Any) -> str:
    names = ", ".join(sorted(param.opts, key=lambda o: (not o.startswith("--"), o)))
    if param.secondary_opts:
        names += " / " + ", ".join(param.secondary_opts)
    return names


def _metavar(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return ""
    if getattr(param, "metavar", None):
        return param.metavar
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if annotation is None:  # click's own parameters carry a type object instead
        annotation = getattr(getattr(param, "type", None), "name", "")
    annotation = next(iter(typing.get_args(annotation)), annotation)  # list[str] -> str
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "|".join(str(member.value) for member in annotation)
    names = {int: "INT", float: "NUMBER", str: "TEXT", Path: "PATH", "integer": "INT", "float": "NUMBER"}
    return names.get(annotation, "VALUE")


def _default(param: Any) -> str:
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    if shown is False or getattr(param, "is_flag", False) or param.default in (None, (), []):
        return ""
    default = param.default
    default = getattr(default, "value", default)  # enums
    return str(default)


def option_entry(param: Any) -> list[str]:
    """One option: its names and metavar on one line (never cut), the description wrapped below."""
    head = f"  {_names(param)}"
    metavar = _metavar(param)
    if metavar:
        head += f" {metavar}"
    text = " ".join((getattr(param, "help", None) or "").split())
    default = _default(param)
    if default:
        text += f" [default: {default}]"
    body = textwrap.wrap(text, WIDTH - INDENT, initial_indent=" " * INDENT, subsequent_indent=" " * INDENT)
    return [head, *body]


def plain_help(command: Any, prog: str) -> str:
    """The command's help as plain text, at most 80 columns."""
    lines = [f"Usage: {prog} [OPTIONS]", *(f"       {prog} {usage} [OPTIONS]" for usage, _ in COMMANDS), ""]
    summary = " ".join((command.help or "").split("\n\n")[0].split())
    lines += [*textwrap.wrap(summary, WIDTH), ""]
    for paragraph in (command.help or "").split("\n\n")[1:]:
        lines += [*textwrap.wrap(" ".join(paragraph.split()), WIDTH), ""]
    lines.append("Commands:")
    for usage, what in COMMANDS:
        lines.append(f"  {usage:<17s}{what}")
    lines.append("")
    panels: dict[str, list[Any]] = {}
    for param in command.params:
        is_option = all(o.startswith("-") for o in param.opts)  # typer may carry its own click copy
        if is_option and not getattr(param, "hidden", False) and "--help" not in param.opts:
            panels.setdefault(getattr(param, "rich_help_panel", None) or OTHER_PANEL, []).append(param)
    for panel, params in panels.items():
        lines.append(f"{panel}:")
        for param in params:
            lines += option_entry(param)
        lines.append("")
    lines.append("  -h, --help")
    lines.append(" " * INDENT + "Show this message and exit.")
    lines += ["", *textwrap.wrap(UPSTREAM_NOTE, WIDTH)]
    return "\n".join(lines) + "\n"
