"""The documentation and the CLI agree: every option of the command is in the option reference
(docs/options.md), and every option any README or docs/ table names is one the command accepts
(upstream underscore spellings included)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from magcache_generate.argv import command_options, normalize_argv
from magcache_generate.cli import app

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
OPTIONS = ROOT / "docs" / "options.md"
STANDARD = {"--help", "-h", "--version"}
SUBCOMMANDS = ("compare", "convert")


def table_options(*files: Path) -> set[str]:
    rows = [line for file in files for line in file.read_text().splitlines() if line.startswith("|")]
    return {match for row in rows for match in re.findall(r"`(--[A-Za-z0-9][A-Za-z0-9_-]*)", row)}


def documented_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def subcommand_options() -> set[str]:
    """The options of the subcommands (``compare``, ``convert``): each module's ``command()``."""
    import importlib

    return {
        option
        for name in SUBCOMMANDS
        for option in command_options(importlib.import_module(f"magcache_generate.{name}").command())
    } - STANDARD


def test_every_option_is_in_the_option_reference():
    options = set(command_options(typer.main.get_command(app))) - STANDARD
    assert sorted(options - table_options(OPTIONS)) == []


def test_every_subcommand_option_is_in_the_option_reference():
    assert sorted(subcommand_options() - table_options(OPTIONS)) == []


def test_every_documented_option_exists():
    options = set(command_options(typer.main.get_command(app))) | subcommand_options()
    unknown = []
    for option in sorted(table_options(*documented_files())):
        # upstream spellings go through the same normalisation as a real command line
        takes_value = (
            option.replace("_", "-") in options or option == "--lora_dir2"
        )  # fork alias of --lora-dir
        spelled = normalize_argv([option, "1"] if takes_value else [option])
        name = spelled[0].partition("=")[0] if spelled else option
        if name not in options:
            unknown.append(option)
    assert unknown == []


def test_readme_lists_the_options_that_matter_most():
    section = README.read_text().split("## The options that matter most", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    assert len(rows) == 10
