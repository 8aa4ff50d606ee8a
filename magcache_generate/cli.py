"""The ``magcache-generate`` command: upstream ``generate.py``'s options (both spellings) plus MagCache.

Importing this module stays cheap (typer, rich, the torch-free configs): torch, transformers and the
models load only inside the command, after every input has been validated.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from magcache_generate import __version__
from magcache_generate.allocator import prefer_expandable_segments
from magcache_generate.argv import check_option_names, command_options, normalize_argv
from magcache_generate.atomic import OutputPathError
from magcache_generate.command import EXIT_FAILURE, run_command
from magcache_generate.options import GenerateOptions, option_parameters
from magcache_generate.parallel import RankFailed, silent_error, silent_interrupt
from magcache_generate.request import OutOfMemory, UserError
from wan.errors import CheckpointError

try:  # typer >= 0.16 ships its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException

PROG = "magcache-generate"
EXIT_USAGE = 2  # bad input (found before loading: nothing was loaded or written)
EXIT_INTERRUPTED = 130
# Errors that are the user's to fix, also when raised while running: one line, exit 2, no traceback
# (unless --debug). FileExistsError: an output appeared while we generated.
SILENT_RANK_GRACE_S = 30.0
USER_ERRORS = (UserError, CheckpointError, FileExistsError, OutputPathError)

app = typer.Typer(
    name=PROG,
    help="Generate a video with Wan 2.2 (t2v-A14B, i2v-A14B, ti2v-5B), optionally with MagCache step skipping.\n\n"
    "Upstream generate.py spellings (--frame_num, --offload_model True, ...) are accepted too.",
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,  # our own one-line errors; tracebacks only with --debug
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {__version__}")
        raise typer.Exit()


def generate(**params: object) -> None:
    """Generate a video with Wan 2.2, optionally with MagCache step skipping."""
    options = GenerateOptions.from_params(params)
    with _reported_errors(options.debug):
        code = run_command(options)
    if code:
        raise typer.Exit(code)


# The parameters are GenerateOptions' fields (options.py), plus --version.
generate.__signature__ = inspect.Signature(
    [
        *option_parameters(),
        inspect.Parameter(
            "version",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--version",
                    callback=_show_version,
                    is_eager=True,
                    help="Show the version and exit.",
                    rich_help_panel="General",
                ),
            ],
        ),
    ]
)
app.command(
    epilog="Other commands: magcache-generate compare A B (PSNR and SSIM of video B against A) and "
    "magcache-generate convert SRC OUT (one DiT to one file: fp8, bf16 or fp16); each with --help."
)(generate)


# ---------------------------------------------------------------------------------------------------
# Errors and the entry point


def error_line(err: BaseException) -> str:
    """The one line shown for an error: its message, newlines folded."""
    if isinstance(err, ClickException):
        message = err.format_message()
    else:
        message = str(err) or type(err).__name__
    return " ".join(message.split())


def exit_code_for(err: BaseException, debug: bool, prog: str = PROG) -> int:
    """Print ``err`` as one ``error:`` line on stderr (plus the traceback with --debug); its exit code.

    Under torchrun a bad input stops every rank and only rank 0 says so; a rank that fails while
    running says which rank it is."""
    if isinstance(err, (KeyboardInterrupt, typer.Abort)) and silent_interrupt():
        return EXIT_INTERRUPTED  # torchrun interrupts every rank at once: rank 0's line is enough
    if isinstance(err, RankFailed):
        if debug:
            traceback.print_exception(err.original)
        typer.echo(f"error: {error_line(err)}", err=True)
        return EXIT_USAGE if isinstance(err.original, USER_ERRORS) else EXIT_FAILURE
    if silent_error(err, (*USER_ERRORS, ClickException)):
        with contextlib.redirect_stderr(io.StringIO()):
            code = _reported_code(err, debug, prog)
        # torchrun ends every rank once one exits: let rank 0 (which says why) exit first; it then ends
        # this one, so the wait is bounded and costs nothing when rank 0 is on time.
        time.sleep(SILENT_RANK_GRACE_S)
        return code
    return _reported_code(err, debug, prog)


def _reported_code(err: BaseException, debug: bool, prog: str) -> int:
    if isinstance(err, (KeyboardInterrupt, typer.Abort)):
        typer.echo("error: interrupted", err=True)
        return EXIT_INTERRUPTED
    if debug:
        traceback.print_exception(err)
    if isinstance(err, ClickException):
        typer.echo(f"error: {error_line(err)} (see {prog} --help)", err=True)
        return err.exit_code
    if isinstance(err, USER_ERRORS):
        typer.echo(f"error: {error_line(err)}", err=True)
        return EXIT_USAGE
    if isinstance(err, OutOfMemory):
        typer.echo(f"error: {error_line(err)}", err=True)
        return EXIT_FAILURE
    hint = "" if debug else "; rerun with --debug for the traceback"
    typer.echo(f"error: unexpected {type(err).__name__}: {error_line(err)}{hint}", err=True)
    return EXIT_FAILURE


@contextmanager
def _reported_errors(debug: bool) -> Iterator[None]:
    """Inside the command: turn exceptions into one-line messages and exit codes (also under CliRunner)."""
    try:
        yield
    except typer.Exit:
        raise
    except (Exception, KeyboardInterrupt) as err:
        raise typer.Exit(exit_code_for(err, debug)) from None


def _wants_help(argv: list[str]) -> bool:
    """Whether this command line asks for --help (before a bare ``--``)."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    return any(a in ("-h", "--help") for a in head)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: normalise upstream spellings, check the option names, run the app,
    exit with its code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    subcommand = argv[0] if argv[:1] in (["compare"], ["convert"]) else None
    prog = f"{PROG} {subcommand}" if subcommand else PROG
    try:
        if subcommand is not None:  # `compare A B` (compare.py), `convert SRC OUT --to ...` (convert.py)
            import importlib

            module = importlib.import_module(f"magcache_generate.{subcommand}")
            args = [a for a in argv[1:] if a != "--debug"]
            code = module.command().main(args=args, prog_name=prog, standalone_mode=False)
        elif _wants_help(argv) and not sys.stdout.isatty():  # piped or logged: plain, 80 columns
            from magcache_generate.help_text import plain_help

            sys.stdout.write(plain_help(typer.main.get_command(app), PROG))
            code = 0
        else:
            prefer_expandable_segments()  # before anything touches CUDA (the budget probe does)
            command = typer.main.get_command(app)
            options = command_options(command)  # every spelling, from the command itself
            args = normalize_argv(argv, options)
            check_option_names(args, options)
            code = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except (Exception, KeyboardInterrupt) as err:
        code = exit_code_for(err, debug, prog)
    sys.exit(code or 0)
