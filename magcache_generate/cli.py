"""The ``magcache-generate`` command: upstream ``generate.py``'s options (both spellings) plus MagCache.

Importing this module stays cheap (typer, rich, the torch-free configs): torch, transformers and the
models load only inside the command, after every input has been validated.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from magcache_generate import __version__
from magcache_generate.allocator import prefer_expandable_segments
from magcache_generate.argv import check_option_names, command_options, normalize_argv
from magcache_generate.atomic import OutputPathError
from magcache_generate.command import EXIT_FAILURE, run_command
from magcache_generate.request import OutOfMemory, UserError
from magcache_generate.validate import (
    MAX_FRAME_NUM,
    MAX_SAMPLE_STEPS,
    GenerateOptions,
)
from wan.attention_backends import BACKENDS as ATTENTION_BACKENDS
from wan.errors import CheckpointError

if TYPE_CHECKING:
    pass

try:  # typer >= 0.16 ships its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import ClickException

PROG = "magcache-generate"
EXIT_USAGE = 2  # bad input (found before loading: nothing was loaded or written)
EXIT_INTERRUPTED = 130
# Errors that are the user's to fix, also when raised while running: one line, exit 2, no traceback
# (unless --debug). FileExistsError: an output appeared while we generated.
USER_ERRORS = (UserError, CheckpointError, FileExistsError, OutputPathError)

# Options grouped into rich help panels.
InTask = functools.partial(typer.Option, rich_help_panel="Task")
InSampling = functools.partial(typer.Option, rich_help_panel="Sampling")
InMemory = functools.partial(typer.Option, rich_help_panel="Memory")
InOutput = functools.partial(typer.Option, rich_help_panel="Output")
InMagCache = functools.partial(typer.Option, rich_help_panel="MagCache")
InBatch = functools.partial(typer.Option, rich_help_panel="Batch")
InLora = functools.partial(typer.Option, rich_help_panel="LoRAs and distilled models")
InSpeed = functools.partial(typer.Option, rich_help_panel="Speed")


class Task(str, Enum):
    t2v_a14b = "t2v-A14B"
    i2v_a14b = "i2v-A14B"
    ti2v_5b = "ti2v-5B"


class Solver(str, Enum):
    unipc = "unipc"
    dpmpp = "dpm++"
    euler = "euler"


class Distilled(str, Enum):
    lightning = "lightning"
    none = "none"


AttentionBackend = Enum("AttentionBackend", {name: name for name in ATTENTION_BACKENDS}, type=str)


class CfgBatchMode(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class MagCacheMode(str, Enum):
    aligned = "aligned"
    official = "official"


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


@app.command()
def generate(
    task: Annotated[Task, InTask(help="What to generate.")] = Task.t2v_a14b,
    ckpt_dir: Annotated[Path | None, InTask(help="Folder with the task's official weights.")] = None,
    dit: Annotated[
        Path | None,
        InTask(
            help="ti2v-5B transformer: a single .safetensors file (Comfy-Org's too) or an official folder."
        ),
    ] = None,
    dit_high: Annotated[
        Path | None, InTask(help="A14B high-noise expert: a single file or an official folder.")
    ] = None,
    dit_low: Annotated[
        Path | None, InTask(help="A14B low-noise expert: a single file or an official folder.")
    ] = None,
    t5: Annotated[
        Path | None,
        InTask(help="umT5-XXL text encoder file (.pth, or .safetensors in Wan or Hugging Face names)."),
    ] = None,
    vae: Annotated[Path | None, InTask(help="VAE file (.pth or .safetensors).")] = None,
    tokenizer: Annotated[Path | None, InTask(help="umT5 tokenizer folder (google/umt5-xxl).")] = None,
    prompt: Annotated[
        str | None, InTask(help="Text prompt", show_default="upstream's example prompt")
    ] = None,
    negative_prompt: Annotated[
        str | None, InTask(help="Negative prompt", show_default="the official one")
    ] = None,
    image: Annotated[
        Path | None, InTask(help="First frame: required by i2v-A14B, optional for ti2v-5B.")
    ] = None,
    size: Annotated[
        str | None, InTask(help="W*H (or WxH)", show_default="1280*720; ti2v-5B 1280*704")
    ] = None,
    frame_num: Annotated[
        int | None, InTask(help=f"Frames, 4n+1, at most {MAX_FRAME_NUM}", show_default="81; ti2v-5B 121")
    ] = None,
    demo: Annotated[
        bool, InTask("--demo", help="Use tiny random weights (no download; the video is noise).")
    ] = False,
    sample_solver: Annotated[
        Solver | None, InSampling(help="Sampler.", show_default="unipc; euler with --distilled lightning")
    ] = None,
    sample_steps: Annotated[
        int | None, InSampling(help=f"Steps, at most {MAX_SAMPLE_STEPS}", show_default="40; ti2v-5B 50")
    ] = None,
    sample_shift: Annotated[
        float | None, InSampling(help="Sigma shift", show_default="12 t2v; 5 i2v, ti2v")
    ] = None,
    sample_guide_scale: Annotated[
        str | None,
        InSampling(
            help="CFG scale: one value, or two 'LOW HIGH' for the low- and high-noise experts",
            show_default="3.0 4.0 t2v; 3.5 i2v; 5.0 ti2v",
        ),
    ] = None,
    base_seed: Annotated[int, InSampling(help="Seed; -1 draws a random one (printed).")] = -1,
    device: Annotated[str, InMemory(help="auto, cpu, cuda or cuda:N.")] = "auto",
    offload_model: Annotated[
        bool | None,
        InMemory(
            "--offload-model/--no-offload-model",
            help="Move models off the GPU when idle",
            show_default="on, as upstream on one GPU",
        ),
    ] = None,
    convert_model_dtype: Annotated[
        bool, InMemory("--convert-model-dtype", help="Keep the DiT weights in bf16 (upstream's flag).")
    ] = False,
    quantize: Annotated[
        str | None,
        InMemory(help="fp8: keep the DiT block Linears' weights in float8 (half of bf16's memory)."),
    ] = None,
    fp8_matmul: Annotated[
        str,
        InSpeed(help="fp8 Linears multiply in fp8 (auto = on GPUs of compute capability >= 8.9), on or off."),
    ] = "auto",
    t5_cpu: Annotated[bool, InMemory("--t5-cpu", help="Run the text encoder on the CPU.")] = False,
    vae_tiled: Annotated[
        bool, InMemory("--vae-tiled", help="Decode the VAE in tiles (less memory).")
    ] = False,
    attention: Annotated[
        AttentionBackend,
        InSpeed(
            help="Attention kernel: auto picks the fastest exact one (FlashAttention-3 if installed, on "
            "Hopper; else PyTorch SDPA's choice); or force cudnn, flash, efficient, math (SDPA) or fa3, fa2."
        ),
    ] = AttentionBackend.auto,
    compile: Annotated[
        bool,
        InSpeed(
            "--compile",
            help="torch.compile the transformer block (once per video size; its time is reported apart).",
        ),
    ] = False,
    cfg_batch: Annotated[
        CfgBatchMode,
        InSpeed(
            help="CFG steps as one batch-2 forward (cond and uncond stacked; same math): auto = on for CUDA "
            "runs whose memory plan has room for the doubled activations, off on the CPU; on forces it."
        ),
    ] = CfgBatchMode.auto,
    gpu_memory: Annotated[
        str | None,
        InMemory(
            help="GPU memory budget in GB (GiB), or auto: plans resident/streamed DiT blocks, text encoder "
            "placement, VAE tiling and FFN chunking to fit it",
            show_default="auto: free memory minus a margin",
        ),
    ] = None,
    save_file: Annotated[
        Path | None, InOutput(help="Output video", show_default="upstream's name pattern, shell-safe")
    ] = None,
    save_frames: Annotated[
        Path | None, InOutput(help="Also write every frame as PNG into this folder.")
    ] = None,
    overwrite: Annotated[bool, InOutput("--overwrite", help="Replace existing outputs.")] = False,
    crf: Annotated[int, InOutput(help="H.264 quality, 0 (lossless) to 51.")] = 10,
    use_magcache: Annotated[
        bool, InMagCache("--use-magcache", help="Skip DiT block stacks whose output MagCache predicts.")
    ] = False,
    magcache_thresh: Annotated[
        float | None, InMagCache(help="Error budget", show_default="0.06 preset")
    ] = None,
    magcache_k: Annotated[
        int | None,
        InMagCache("--magcache-K", "--magcache-k", help="Most consecutive skips", show_default="2"),
    ] = None,
    retention_ratio: Annotated[
        float | None, InMagCache(help="Share of steps that always compute first", show_default="per task")
    ] = None,
    magcache_mode: Annotated[
        MagCacheMode | None,
        InMagCache(
            help="aligned (defects fixed) or official (upstream call for call)", show_default="aligned"
        ),
    ] = None,
    magcache_ratios: Annotated[
        Path | None, InMagCache(help="Calibrated ratios JSON", show_default="the official curve")
    ] = None,
    magcache_calibrate: Annotated[
        Path | None, InMagCache(help="Dense run that records the ratios into this JSON file.")
    ] = None,
    magcache_speedup: Annotated[
        float | None, InMagCache(help="Pick the smallest threshold reaching this ideal speedup.")
    ] = None,
    magcache_verify: Annotated[
        bool,
        InMagCache(
            "--magcache-verify",
            help="Also run dense (same seed) and report the measured speedup and PSNR/SSIM vs the dense "
            "video (written as <name>.dense.mp4).",
        ),
    ] = False,
    magcache_plan: Annotated[
        bool,
        InMagCache(
            "--magcache-plan", help="Print which steps MagCache would skip, then exit (loads nothing)."
        ),
    ] = False,
    as_json: Annotated[
        bool, InMagCache("--json", help="With --magcache-plan: print one JSON object.")
    ] = False,
    lora: Annotated[
        list[str] | None,
        InLora(
            help="LoRA merged into every expert at load: FILE or FILE:SCALE (repeatable).",
            show_default=False,
            metavar="FILE[:SCALE]",
        ),
    ] = None,
    lora_high: Annotated[
        list[str] | None,
        InLora(
            help="LoRA for the A14B high-noise expert only (repeatable).",
            show_default=False,
            metavar="FILE[:SCALE]",
        ),
    ] = None,
    lora_low: Annotated[
        list[str] | None,
        InLora(
            help="LoRA for the A14B low-noise expert only (repeatable).",
            show_default=False,
            metavar="FILE[:SCALE]",
        ),
    ] = None,
    lora_dir: Annotated[
        list[Path] | None,
        InLora(
            help="Lightning fork layout: DIR/high_noise_model.safetensors + low_noise_model.safetensors "
            "(ti2v-5B: diffusion_pytorch_model.safetensors); implies --distilled lightning.",
            show_default=False,
            metavar="DIR",
        ),
    ] = None,
    distilled: Annotated[
        Distilled | None,
        InLora(
            help="Step-distilled recipe: lightning = 4 steps, shift 5, guide 1, euler (unset options only)."
        ),
    ] = None,
    prompt_file: Annotated[
        Path | None, InBatch(help="One prompt (or JSON object) per line; models load once.")
    ] = None,
    debug: Annotated[bool, InBatch("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit."),
    ] = False,
) -> None:
    """Generate a video with Wan 2.2, optionally with MagCache step skipping."""
    # The parameters carry GenerateOptions' field names; enums become their plain string values.
    given = locals()
    options = GenerateOptions(**{f.name: _plain(given[f.name]) for f in dataclasses.fields(GenerateOptions)})
    with _reported_errors(debug):
        code = run_command(
            options, prompt_file=prompt_file, demo=demo, plan=magcache_plan, as_json=as_json, debug=debug
        )
    if code:
        raise typer.Exit(code)


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


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
    """Print ``err`` as one ``error:`` line on stderr (plus the traceback with --debug); its exit code."""
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
        else:
            prefer_expandable_segments()  # before anything touches CUDA (the budget probe does)
            command = typer.main.get_command(app)
            args = normalize_argv(argv)
            check_option_names(args, command_options(command))
            code = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except (Exception, KeyboardInterrupt) as err:
        code = exit_code_for(err, debug, prog)
    sys.exit(code or 0)
