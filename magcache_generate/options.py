"""The generate command's options, in one table: each field of `GenerateOptions` is one option, its
type, its default and its typer declaration (spellings, help, panel) together.

The typer command (`cli.py`) takes its parameters from this table, the upstream underscore spellings
(`argv.py`) are derived from the command, and `GenerateOptions.from_params` reads the parsed values
back by field name. Adding an option is adding a field here: it then has its flag, its underscore
spelling, its --help entry and its value in `GenerateOptions`. What the option does is then written
where it acts: a setting of the run is validated once in `validate.build_request` (which fills the
`Request` field the run reads); a run-wide decision from it belongs to `run_plan.RunPlan`. Ranges are
not declared here: each is checked once, by `validate` (or the policy it delegates to), with one
message. Torch-free.
"""

import dataclasses
import functools
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from wan.attention_backends import BACKENDS as ATTENTION_BACKENDS

# Fixed upper bounds (see validate.check_limits): far beyond any useful run, low enough to refuse a typo.
MAX_FRAME_NUM = 1001  # 62 s at 16 fps; 250 latent frames
MAX_SAMPLE_STEPS = 1000  # the scheduler's whole training range
MAX_CRF = 51  # libx264's range for 8-bit video is 0..51

# Options grouped into rich help panels.
InTask = functools.partial(typer.Option, rich_help_panel="Task")
InSampling = functools.partial(typer.Option, rich_help_panel="Sampling")
InMemory = functools.partial(typer.Option, rich_help_panel="Memory")
InOutput = functools.partial(typer.Option, rich_help_panel="Output")
InMagCache = functools.partial(typer.Option, rich_help_panel="MagCache")
InBatch = functools.partial(typer.Option, rich_help_panel="Batch")
InLora = functools.partial(typer.Option, rich_help_panel="LoRAs and distilled models")
InSpeed = functools.partial(typer.Option, rich_help_panel="Speed")
InPlan = functools.partial(typer.Option, rich_help_panel="Plan before running (no GPU, no weights)")
InGeneral = functools.partial(typer.Option, rich_help_panel="General")
InParallel = functools.partial(typer.Option, rich_help_panel="Several GPUs (under torchrun)")


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


class CompileMode(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class MagCacheMode(str, Enum):
    aligned = "aligned"
    official = "official"


@dataclass(frozen=True)
class GenerateOptions:
    """The generation options as given on the command line, in --help order; ``None`` means "not
    given" (the task's default, or the distilled recipe's). Enum-typed options hold their plain value."""

    task: Annotated[Task, InTask(help="What to generate.")] = "t2v-A14B"
    ckpt_dir: Annotated[
        Path | None, InTask(help="The task's official weights folder, e.g. ./Wan2.2-T2V-A14B.")
    ] = None
    # Each part of the weights from its own file or folder; each overrides that part of --ckpt-dir
    # (magcache_generate.weight_paths), which may be left out when every part is given.
    dit: Annotated[
        Path | None,
        InTask(
            help="ti2v-5B transformer: a single .safetensors file (Comfy-Org's too) or an official folder."
        ),
    ] = None
    dit_high: Annotated[
        Path | None, InTask(help="A14B high-noise expert: a single file or an official folder.")
    ] = None
    dit_low: Annotated[
        Path | None, InTask(help="A14B low-noise expert: a single file or an official folder.")
    ] = None
    t5: Annotated[
        Path | None,
        InTask(help="umT5-XXL text encoder file (.pth, or .safetensors in Wan or Hugging Face names)."),
    ] = None
    vae: Annotated[Path | None, InTask(help="VAE file (.pth or .safetensors).")] = None
    tokenizer: Annotated[Path | None, InTask(help="umT5 tokenizer folder (google/umt5-xxl).")] = None
    prompt: Annotated[
        str | None, InTask(help="What the video shows, in quotes.", show_default="upstream's example prompt")
    ] = None
    negative_prompt: Annotated[
        str | None, InTask(help="What the video should avoid, in quotes.", show_default="the official one")
    ] = None
    image: Annotated[Path | None, InTask(help="First frame: required by i2v-A14B, optional for ti2v-5B.")] = (
        None
    )
    size: Annotated[
        str | None,
        InTask(help="Width*height, e.g. 832*480 (or 832x480).", show_default="1280*720; ti2v-5B 1280*704"),
    ] = None
    frame_num: Annotated[
        int | None,
        InTask(help=f"Frames, 4n+1 (e.g. 81), at most {MAX_FRAME_NUM}", show_default="81; ti2v-5B 121"),
    ] = None
    settings_from: Annotated[
        Path | None,
        InTask(
            help="Run again the settings stored in a video made here (or its .json sidecar); options "
            "given with other values override them.",
            metavar="FILE",
        ),
    ] = None
    demo: Annotated[
        bool, InTask("--demo", help="Use tiny random weights (no download; the video is noise).")
    ] = False
    sample_solver: Annotated[
        Solver | None, InSampling(help="Sampler.", show_default="unipc; euler with --distilled lightning")
    ] = None
    sample_steps: Annotated[
        int | None, InSampling(help=f"Steps, at most {MAX_SAMPLE_STEPS}", show_default="40; ti2v-5B 50")
    ] = None
    sample_shift: Annotated[
        float | None,
        InSampling(help="Sigma shift of the schedule, e.g. 5", show_default="12 t2v; 5 i2v, ti2v"),
    ] = None
    # a prompt-file item may also give a number or a (low, high) pair
    sample_guide_scale: Annotated[
        str | None,
        InSampling(
            help="CFG scale: one value, or two 'LOW HIGH' for the low- and high-noise experts",
            show_default="3.0 4.0 t2v; 3.5 i2v; 5.0 ti2v",
        ),
    ] = None
    base_seed: Annotated[int, InSampling(help="Seed; -1 draws a random one (printed).")] = -1
    device: Annotated[str, InMemory(help="Where to run: auto, cpu, cuda or cuda:N.")] = "auto"
    offload_model: Annotated[
        bool | None,
        InMemory(
            "--offload-model/--no-offload-model",
            help="Move models off the GPU when idle",
            show_default="on, as upstream on one GPU",
        ),
    ] = None
    convert_model_dtype: Annotated[
        bool, InMemory("--convert-model-dtype", help="Keep the DiT weights in bf16 (upstream's flag).")
    ] = False
    quantize: Annotated[
        str | None,
        InMemory(help="fp8: keep the DiT block Linears' weights in float8 (half of bf16's memory)."),
    ] = None
    fp8_matmul: Annotated[
        str,
        InSpeed(help="fp8 Linears multiply in fp8 (auto = on GPUs of compute capability >= 8.9), on or off."),
    ] = "auto"
    t5_cpu: Annotated[bool, InMemory("--t5-cpu", help="Run the text encoder on the CPU.")] = False
    vae_tiled: Annotated[bool, InMemory("--vae-tiled", help="Decode the VAE in tiles (less memory).")] = False
    attention: Annotated[
        AttentionBackend,
        InSpeed(
            help="Attention kernel: auto picks the fastest exact one (FlashAttention-3 if installed, on "
            "Hopper; else PyTorch SDPA's choice); or force cudnn, flash, efficient, math (SDPA) or fa3, fa2."
        ),
    ] = "auto"
    compile: Annotated[
        CompileMode,
        InSpeed(
            help="torch.compile the transformer block (once per video size, kept in an on-disk cache; its "
            "time is reported apart): auto = on for CUDA runs with enough forwards to repay the compile "
            "time, off on the CPU; a bare --compile means on.",
        ),
    ] = "auto"
    cfg_batch: Annotated[
        CfgBatchMode,
        InSpeed(
            help="CFG steps as one batch-2 forward (cond and uncond stacked; same math): auto = on for CUDA "
            "runs whose memory plan has room for the doubled activations, off on the CPU; on forces it."
        ),
    ] = "auto"
    gpu_memory: Annotated[
        str | None,
        InMemory(
            help="GPU memory budget in GB (GiB), or auto: plans resident/streamed DiT blocks, text encoder "
            "placement, VAE tiling and FFN chunking to fit it",
            show_default="auto: free memory minus a margin",
        ),
    ] = None
    save_file: Annotated[
        Path | None, InOutput(help="Output video", show_default="upstream's name pattern, shell-safe")
    ] = None
    output_dir: Annotated[
        Path | None,
        InOutput(
            help="Folder for the videos (created if missing); a relative --save-file goes inside it.",
            show_default="the current folder",
        ),
    ] = None
    save_frames: Annotated[Path | None, InOutput(help="Also write every frame as PNG into this folder.")] = (
        None
    )
    overwrite: Annotated[bool, InOutput("--overwrite", help="Replace existing outputs.")] = False
    crf: Annotated[int, InOutput(help=f"H.264 quality, 0 (lossless) to {MAX_CRF}.")] = 10
    use_magcache: Annotated[
        bool, InMagCache("--use-magcache", help="Skip DiT block stacks whose output MagCache predicts.")
    ] = False
    magcache_thresh: Annotated[
        float | None,
        InMagCache(help="Error budget, e.g. 0.06; higher skips more", show_default="0.06 preset"),
    ] = None
    magcache_k: Annotated[
        int | None,
        InMagCache("--magcache-K", "--magcache-k", help="Most consecutive skips, e.g. 2", show_default="2"),
    ] = None
    retention_ratio: Annotated[
        float | None,
        InMagCache(help="Share of steps that always compute first, e.g. 0.2", show_default="per task"),
    ] = None
    magcache_mode: Annotated[
        MagCacheMode | None,
        InMagCache(
            help="aligned (defects fixed) or official (upstream call for call)", show_default="aligned"
        ),
    ] = None
    magcache_ratios: Annotated[
        Path | None, InMagCache(help="Calibrated ratios JSON file", show_default="the official curve")
    ] = None
    magcache_calibrate: Annotated[
        Path | None, InMagCache(help="Dense run that records the ratios into this JSON file.")
    ] = None
    magcache_speedup: Annotated[
        float | None, InMagCache(help="Pick the smallest threshold reaching this ideal speedup, e.g. 2.")
    ] = None
    magcache_verify: Annotated[
        bool,
        InMagCache(
            "--magcache-verify",
            help="Also run dense (same seed) and report the measured speedup and PSNR/SSIM vs the dense "
            "video (written as <name>.dense.mp4).",
        ),
    ] = False
    magcache_plan: Annotated[
        bool,
        InPlan(
            "--magcache-plan",
            help="Print which steps MagCache would skip and, with --gpu-memory GB, the memory plan for a "
            "GPU of that size; then exit (loads nothing, needs no GPU).",
        ),
    ] = False
    as_json: Annotated[bool, InPlan("--json", help="With --magcache-plan: print one JSON object.")] = False
    lora: Annotated[
        list[str] | None,
        InLora(
            help="LoRA merged into every expert at load: FILE or FILE:SCALE (repeatable).",
            show_default=False,
            metavar="FILE[:SCALE]",
        ),
    ] = None
    lora_high: Annotated[
        list[str] | None,
        InLora(
            help="LoRA for the A14B high-noise expert only (repeatable).",
            show_default=False,
            metavar="FILE[:SCALE]",
        ),
    ] = None
    lora_low: Annotated[
        list[str] | None,
        InLora(
            help="LoRA for the A14B low-noise expert only (repeatable).",
            show_default=False,
            metavar="FILE[:SCALE]",
        ),
    ] = None
    lora_dir: Annotated[
        list[Path] | None,
        InLora(
            help="Lightning fork layout: DIR/high_noise_model.safetensors + low_noise_model.safetensors "
            "(ti2v-5B: diffusion_pytorch_model.safetensors); implies --distilled lightning.",
            show_default=False,
            metavar="DIR",
        ),
    ] = None
    distilled: Annotated[
        Distilled | None,
        InLora(
            help="Step-distilled recipe: lightning = 4 steps, shift 5, guide 1, euler (unset options only)."
        ),
    ] = None
    ulysses_size: Annotated[
        int,
        InParallel(
            help="Ulysses sequence parallel: split each video's tokens over this many ranks (must divide "
            "the attention heads: 40 for A14B, 24 for ti2v-5B)."
        ),
    ] = 1
    cfg_parallel: Annotated[
        bool,
        InParallel(
            "--cfg-parallel", help="Run the cond and uncond forwards of a step on two rank groups at once."
        ),
    ] = False
    dit_fsdp: Annotated[
        bool, InParallel("--dit-fsdp", help="Shard the DiT blocks over the Ulysses group (FSDP2).")
    ] = False
    t5_fsdp: Annotated[
        bool,
        InParallel(
            "--t5-fsdp", help="Encode the text on one rank per group and share it (saves its memory)."
        ),
    ] = False
    prompt_file: Annotated[
        Path | None, InBatch(help="Text file with one prompt (or JSON object) per line; models load once.")
    ] = None
    debug: Annotated[bool, InGeneral("--debug", help="Show the traceback of an error.")] = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "GenerateOptions":
        """The options from a parsed command's values (by field name; enums become their values)."""
        return cls(**{f.name: _plain(params[f.name]) for f in dataclasses.fields(cls) if f.name in params})


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def option_parameters() -> list[inspect.Parameter]:
    """`GenerateOptions` as keyword parameters of a typer command (Enum-typed defaults as members)."""
    hints = typing.get_type_hints(GenerateOptions, include_extras=True)
    parameters = []
    for field in dataclasses.fields(GenerateOptions):
        hint = hints[field.name]
        default = field.default
        enum = next(
            (t for t in _types_of(typing.get_args(hint)[0]) if isinstance(t, type) and issubclass(t, Enum)),
            None,
        )
        if enum is not None and default is not None:
            default = enum(default)
        parameters.append(
            inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hint)
        )
    return parameters


def _types_of(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (``X | None``), or the annotation itself."""
    return typing.get_args(annotation) or (annotation,)
