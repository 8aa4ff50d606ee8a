"""README and CLI agree: every option of the command is documented in README's tables, and every
option those tables name is one the command accepts (upstream underscore spellings included)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from magcache_generate.argv import command_options, normalize_argv
from magcache_generate.cli import app

README = Path(__file__).parents[1] / "README.md"
STANDARD = {"--help", "-h", "--version"}


def table_options() -> set[str]:
    rows = [line for line in README.read_text().splitlines() if line.startswith("|")]
    return {match for row in rows for match in re.findall(r"`(--[A-Za-z0-9][A-Za-z0-9_-]*)", row)}


def test_every_option_is_documented():
    options = set(command_options(typer.main.get_command(app))) - STANDARD
    documented = table_options()
    assert sorted(options - documented) == []


def test_every_documented_option_exists():
    options = set(command_options(typer.main.get_command(app)))
    unknown = []
    for option in sorted(table_options()):
        # upstream spellings go through the same normalisation as a real command line
        takes_value = (
            option.replace("_", "-") in options or option == "--lora_dir2"
        )  # fork alias of --lora-dir
        spelled = normalize_argv([option, "1"] if takes_value else [option])
        name = spelled[0].partition("=")[0] if spelled else option
        if name not in options:
            unknown.append(option)
    assert unknown == []
