"""Command-line normalisation, applied before typer parses: upstream spellings become ours.

Upstream Wan's ``generate.py`` and the MagCache script are argparse programs with underscore options
(``--frame_num 81 --offload_model True --sample_guide_scale 3.0``). ``normalize_argv`` rewrites such
command lines into this CLI's kebab-case form, so existing scripts keep working unchanged. The options
and whether each takes a value are read off the typer command itself (``command_options``), so every
option has its underscore spelling without a list to keep. Options it does not know are left alone
for ``check_option_names`` to reject with a suggestion.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from typing import Any

from magcache_generate.request import UserError

# Upstream parses --offload_model with str2bool; these are the words it accepts.
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0"})

# --compile was a flag before it took auto|on|off: a bare --compile still means on, --no-compile off.
COMPILE, NO_COMPILE = "--compile", "--no-compile"
COMPILE_MODES = frozenset({"auto", "on", "off"})

# Upstream-only options that have no meaning here.
PROMPT_EXTEND_FLAG = "--use-prompt-extend"
# Only read by upstream when --use_prompt_extend is given, so dropping them changes nothing.
PROMPT_EXTEND_VALUE_OPTIONS = frozenset(
    {"--prompt-extend-method", "--prompt-extend-model", "--prompt-extend-target-lang"}
)
# The MagCache script's --magcache_calibration is a flag that writes the ratios into the current folder.
UPSTREAM_CALIBRATION_FLAG = "--magcache-calibration"
UPSTREAM_CALIBRATION_FILE = "mag_ratios.json"
# The Lightning fork's second LoRA folder (--lora_dir2) is one more --lora-dir, merged after the first.
LORA_DIR2 = "--lora-dir2"


def normalize_argv(argv: list[str], options: Mapping[str, bool] | None = None) -> list[str]:
    """Rewrite upstream spellings into this CLI's options; raise ``UserError`` for unusable ones.
    ``options``: every option of the command -> whether it takes a value (default: the generate
    command's, ``command_options``).

    * ``--frame_num 81`` / ``--frame_num=81`` -> ``--frame-num 81`` (any option of the command);
    * ``--offload_model True|False`` (any str2bool word) -> ``--offload-model`` / ``--no-offload-model``;
    * ``--sample_guide_scale 3.0 4.0`` -> ``--sample-guide-scale 3.0,4.0`` (low-noise, high-noise);
    * the prompt-extension settings are dropped (no effect without --use_prompt_extend);
    * ``--magcache_calibration`` -> ``--magcache-calibrate mag_ratios.json``;
    * ``--lora_dir2 DIR`` (the Lightning fork) -> ``--lora-dir DIR``;
    * a bare ``--compile`` (once a flag) -> ``--compile=on``, ``--no-compile`` -> ``--compile=off``.

    Everything after a bare ``--`` is left untouched.
    """
    options = generate_options() if options is None else options
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            out.extend(argv[i - 1 :])
            break
        if not token.startswith("--"):
            out.append(token)
            continue
        name, has_inline, inline_value = token.partition("=")
        name = _canonical_name(name, options)
        value = inline_value if has_inline else None

        if name in ("--offload-model", "--no-offload-model"):
            i, word = _take_bool_word(argv, i, name, value)
            if name == "--no-offload-model":
                word = not word
            out.append("--offload-model" if word else "--no-offload-model")
        elif name in (COMPILE, NO_COMPILE):
            i, mode = _take_compile_mode(argv, i, value)
            out.append(f"{COMPILE}={'off' if name == NO_COMPILE else mode}")
        elif name == "--sample-guide-scale":
            if value is None:
                value, i = _take_value(argv, i, name)
            # Upstream-style pair (low-noise then high-noise). We take no positional arguments, so
            # every number that follows belongs here: a third one is then reported as this option's
            # error instead of as a stray argument.
            while i < len(argv) and _is_number(argv[i]) and _is_number(value.split(",")[-1]):
                value, i = f"{value},{argv[i]}", i + 1
            out.append(f"{name}={value}")
        elif options.get(name) or name == LORA_DIR2:
            if name == LORA_DIR2:
                name = "--lora-dir"
            if value is None:
                value, i = _take_value(argv, i, name)
            out.append(
                f"{name}={value}"
            )  # the '=' form keeps values such as '-1' or '--x' from being options
        elif name in options:
            out.append(name if value is None else f"{name}={value}")  # typer rejects a value on a flag
        elif name == PROMPT_EXTEND_FLAG:
            raise UserError(
                f"{token}: prompt extension (Qwen/DashScope) is not supported; write the full prompt in --prompt"
            )
        elif name in PROMPT_EXTEND_VALUE_OPTIONS:
            if value is None:
                _, i = _take_value(argv, i, name)
        elif name == UPSTREAM_CALIBRATION_FLAG and value is None:
            out.append(f"--magcache-calibrate={UPSTREAM_CALIBRATION_FILE}")
        else:
            out.append(token)  # unknown: typer reports it
    return out


# Upstream-only spellings this module maps (or refuses with a reason) when the command lacks them.
UPSTREAM_ONLY = PROMPT_EXTEND_VALUE_OPTIONS
UPSTREAM_ONLY |= {PROMPT_EXTEND_FLAG, UPSTREAM_CALIBRATION_FLAG, LORA_DIR2, NO_COMPILE}


def _canonical_name(name: str, options: Mapping[str, bool]) -> str:
    """``--frame_num`` -> ``--frame-num`` when that is an option of the command (or one we map);
    otherwise unchanged."""
    kebab = "--" + name[2:].replace("_", "-")
    return kebab if kebab in options or kebab in UPSTREAM_ONLY else name


@functools.cache
def generate_options() -> dict[str, bool]:
    """The generate command's options (``command_options`` of the typer app)."""
    import typer

    from magcache_generate.cli import app  # the command this module serves (imported when first needed)

    return command_options(typer.main.get_command(app))


def _take_value(argv: list[str], i: int, name: str) -> tuple[str, int]:
    if i >= len(argv):
        raise UserError(f"{name} needs a value; see --help")
    return argv[i], i + 1


def _take_bool_word(argv: list[str], i: int, name: str, inline: str | None) -> tuple[int, bool]:
    """Read the optional true/false word after --offload-model (bare flag = true)."""
    word = inline
    if word is None and i < len(argv) and not argv[i].startswith("-"):
        # We take no positional arguments, so a bare word here can only be meant as the flag's value.
        word, i = argv[i], i + 1
    if word is None:
        return i, True
    if word.lower() in TRUE_WORDS:
        return i, True
    if word.lower() in FALSE_WORDS:
        return i, False
    raise UserError(f"{name} takes true or false, got {word!r}; e.g. --offload-model false")


def _take_compile_mode(argv: list[str], i: int, inline: str | None) -> tuple[int, str]:
    """The mode after --compile: auto, on or off (or a true/false word); a bare --compile is on. Any
    other inline value is passed on for the option's own check to refuse."""
    if inline is not None:
        word = inline
    elif i < len(argv) and (argv[i].lower() in COMPILE_MODES | TRUE_WORDS | FALSE_WORDS):
        word, i = argv[i], i + 1
    else:
        return i, "on"
    if word.lower() in TRUE_WORDS:
        return i, "on"
    if word.lower() in FALSE_WORDS:
        return i, "off"
    return i, word.lower() if word.lower() in COMPILE_MODES else word


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def command_options(command: Any) -> dict[str, bool]:
    """Every option spelling of a click/typer ``command`` -> whether it takes a value, read from the
    command itself so that options added to it are known here without a second list."""
    options = dict.fromkeys(("--help", "-h"), False)
    for param in command.params:
        spellings = (*param.opts, *param.secondary_opts)
        if all(s.startswith("-") for s in spellings):  # options (the command has no arguments)
            takes_value = not (getattr(param, "is_flag", False) or getattr(param, "count", False))
            options.update(dict.fromkeys(spellings, takes_value))
    return options


# Unknown options get a suggestion only when it is this close (difflib ratio) to a real one.
SUGGESTION_CUTOFF = 0.6


def check_option_names(argv: list[str], options: Mapping[str, bool]) -> None:
    """Refuse, with one line naming it, the first unknown option or stray argument of a normalised argv.

    ``options`` maps every option of the command to whether it takes a value. An unknown option gets
    the closest real one as a suggestion (upstream's underscores read as dashes), or none when nothing
    is close; a stray word says which option it follows, since it is usually an unquoted value.
    """
    previous: str | None = None
    value_due = False
    for token in argv:
        if value_due:
            value_due = False  # the value of ``previous``
            continue
        if token.startswith("-") and token not in ("-", "--") and not _is_number(token):
            name, has_inline, _ = token.partition("=")
            if name not in options:
                raise UserError(_unknown_option(name, options))
            previous, value_due = name, options[name] and not has_inline
            continue
        raise UserError(_stray_argument(token, previous, options))


def _unknown_option(name: str, options: Mapping[str, bool]) -> str:
    wanted = name.lstrip("-").replace("_", "-").lower()
    longs = [o for o in options if o.startswith("--")]
    scored = [(difflib.SequenceMatcher(None, wanted, o[2:].lower()).ratio(), o) for o in longs]
    score, best = max(scored, default=(0.0, ""))
    if score >= SUGGESTION_CUTOFF:
        return f"unknown option {name}; did you mean {best}?"
    return f"unknown option {name}; see --help for the options"


def _stray_argument(token: str, previous: str | None, options: Mapping[str, bool]) -> str:
    if previous is None:
        return f"unexpected argument {token!r}: this command takes options only (see --help)"
    if not options.get(previous, False):
        return f"unexpected argument {token!r}: {previous} is a flag and takes no value"
    return (
        f"unexpected argument {token!r} after {previous}: quote a value that has spaces, "
        f'e.g. {previous} "a cat on a surfboard"'
    )
