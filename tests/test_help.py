"""`--help` fits: plain text when piped (no box drawing), no line over 80 columns, every option name
whole, options in their panels, the subcommand listed."""

from __future__ import annotations

import subprocess
import sys

import typer

from magcache_generate.argv import command_options
from magcache_generate.cli import app
from magcache_generate.help_text import plain_help

BOX = set("│╭╮╰╯─━┃┏┓┗┛")


def _piped_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "magcache_generate", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _panel(text: str, name: str) -> str:
    return text.split(f"\n{name}:\n", 1)[1].split("\n\n", 1)[0]


def test_piped_help_is_plain_and_fits_80_columns():
    text = _piped_help()
    assert not BOX & set(text)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "magcache-generate compare A B" in text and "Commands:" in text


def test_every_option_name_is_whole_and_in_its_panel():
    command = typer.main.get_command(app)
    text = plain_help(command, "magcache-generate")
    heads = [line.strip() for line in text.splitlines() if line.startswith("  -")]
    for option in command_options(command):
        assert any(option in head.replace(",", " ").split() for head in heads), option
    assert "--magcache-K, --magcache-k INT" in text
    assert "--debug" in _panel(text, "General") and "--debug" not in _panel(text, "Batch")
    assert "--magcache-plan" in _panel(text, "Plan before running (no GPU, no weights)")
    assert "e.g. ./Wan2.2-T2V-A14B" in _panel(text, "Task")
    assert "--output-dir PATH" in _panel(text, "Output")
