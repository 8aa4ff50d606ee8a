"""From command-line values to a validated ``Request``: task defaults applied, every check that can run
before a single weight is loaded, each failure a one-line ``UserError`` naming the input and the fix.

Nothing here reads tensor data: the checkpoint check (``preflight``) reads file headers and pickles
only. No check here imports torch, so every error, including a bad checkpoint file or output path, is
reported instantly; the device check and the strict per-tensor check, which need torch, run after
these (``preflight.check_before_loading``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from magcache_generate.budget import check_gpu_memory
from magcache_generate.cfg_batching import check_cfg_batch
from magcache_generate.compile_choice import check_compile
from magcache_generate.distilled import apply_distilled, recipe_name
from magcache_generate.loras import resolve_loras
from magcache_generate.magcache.policy import MagCacheConfig, MagCacheConfigError
from magcache_generate.naming import default_save_file
from magcache_generate.options import MAX_CRF, MAX_FRAME_NUM, MAX_SAMPLE_STEPS, GenerateOptions
from magcache_generate.preflight import check_checkpoint_dir, check_image, check_outputs
from magcache_generate.quantization import check_fp8_matmul, check_quantize
from magcache_generate.request import MagCacheOptions, Request, UserError
from magcache_generate.weight_paths import PartOptions
from wan.attention_backends import backend_installed, backend_problem
from wan.configs import SIZES, TASKS, TaskConfig

# Upstream generate.py EXAMPLE_PROMPT: the prompt used when --prompt is not given.
CATS_PROMPT = (
    "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."
)
BEACH_CAT_PROMPT = (
    "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred "
    "feline gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the "
    "background featuring crystal-clear waters, distant green hills, and a blue sky dotted with white "
    "clouds. The cat assumes a naturally relaxed posture, as if savoring the sea breeze and warm sunlight. "
    "A close-up shot highlights the feline's intricate details and the refreshing atmosphere of the seaside."
)
EXAMPLE_PROMPTS = {"t2v-A14B": CATS_PROMPT, "i2v-A14B": BEACH_CAT_PROMPT, "ti2v-5B": CATS_PROMPT}

SOLVERS = ("unipc", "dpm++", "euler")
DEFAULT_SOLVER = "unipc"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
MAX_SEED = sys.maxsize  # upstream draws random seeds from [0, sys.maxsize]

# MagCache tuning options and their flags: they only mean something with --use-magcache (or --magcache-plan).
MAGCACHE_TUNING_FLAGS = {
    "magcache_thresh": "--magcache-thresh",
    "magcache_k": "--magcache-K",
    "retention_ratio": "--retention-ratio",
    "magcache_mode": "--magcache-mode",
    "magcache_ratios": "--magcache-ratios",
    "magcache_speedup": "--magcache-speedup",
}
# The MagCacheConfig setting each flag sets (its range errors are reported under the flag's name).
MAGCACHE_SETTING_FLAGS = {
    "thresh": "--magcache-thresh",
    "K": "--magcache-K",
    "retention": "--retention-ratio",
}
MAGCACHE_SETTING_FLAGS["mode"] = "--magcache-mode"


@dataclass(frozen=True)
class PlanSettings:
    """What ``--magcache-plan`` needs: no prompt, no checkpoint, no output paths."""

    task: TaskConfig
    sample_solver: str
    sample_steps: int
    sample_shift: float
    has_image: bool
    magcache: MagCacheOptions
    guide_scale: tuple[float, float] | None = None  # None: the task's; 1 on an expert: cond-only steps


def part_options(options: GenerateOptions) -> PartOptions:
    """The per-part weight flags (--dit, --dit-high, --dit-low, --t5, --vae, --tokenizer)."""
    return PartOptions(
        dit=options.dit,
        dit_high=options.dit_high,
        dit_low=options.dit_low,
        t5=options.t5,
        vae=options.vae,
        tokenizer=options.tokenizer,
    )


# ---------------------------------------------------------------------------------------------------
# Building requests


def default_offload(options: GenerateOptions) -> bool:
    """--offload-model when not given: on (one expert on the GPU at a time, upstream's single-GPU
    default), except with --dit-fsdp, whose experts stay sharded on the GPUs (upstream's multi-GPU way)."""
    return not options.dit_fsdp if options.offload_model is None else options.offload_model


def build_request(
    options: GenerateOptions,
    *,
    now: datetime | None = None,
    item_index: int | None = None,
    check_checkpoint: bool = True,
    rng: random.Random | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Request:
    """Apply the distilled recipe, then ``defaults`` (e.g. --demo's), then the task's defaults to
    ``options``, and validate everything that needs no weights.

    ``item_index`` (1-based position in a prompt file) keeps default output names of a batch apart.
    With ``check_checkpoint=False`` the checkpoint is left to the caller (checked once for a whole
    batch, or built by --demo); a missing --ckpt-dir then becomes ``Path()``.
    """
    cfg = task_config(options.task)
    options = apply_distilled(options)  # the one place a request's recipe is applied
    if defaults:
        unset = {k: v for k, v in defaults.items() if getattr(options, k) is None}
        options = dataclasses.replace(options, **unset)
    size = resolve_size(options.size, cfg)
    frame_num = check_frame_num(cfg.frame_num if options.frame_num is None else options.frame_num)
    solver, steps, shift = check_sampling(
        cfg, options.sample_solver, options.sample_steps, options.sample_shift
    )
    check_limits(cfg, size=size, frame_num=frame_num, sample_steps=steps)
    magcache = magcache_options(options)
    prompt = EXAMPLE_PROMPTS[cfg.name] if options.prompt is None else options.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty; pass --prompt 'what the video shows'")
    if not DEVICE_PATTERN.fullmatch(options.device):
        raise UserError(f"--device {options.device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if not 0 <= options.crf <= MAX_CRF:
        raise UserError(
            f"--crf {options.crf} is out of range; use 0 (lossless) to {MAX_CRF} (10 is upstream's)"
        )
    seed = _resolve_seed(options.base_seed, rng)
    gpu_memory = check_gpu_memory(options.gpu_memory, options.device)
    image = check_image(options.image, cfg)
    check_attention(options.attention, None if options.device == "auto" else options.device.split(":")[0])

    save_file = options.save_file
    if save_file is None:
        name = default_save_file(
            cfg.name, size, prompt, now or datetime.now(), ulysses_size=max(1, options.ulysses_size)
        )
        if item_index is not None:
            name = f"{Path(name).stem}_{item_index:03d}.mp4"
        save_file = Path(name)
    if options.output_dir is not None:
        save_file = under_output_dir(options.output_dir, save_file)
    save_frames = options.save_frames
    if save_frames is not None and item_index is not None:
        save_frames = save_frames / save_file.stem  # one frames folder per batch item

    ckpt_dir, weights = options.ckpt_dir, None
    if check_checkpoint:
        weights = check_checkpoint_dir(ckpt_dir, cfg, part_options(options))
    request = Request(
        task=cfg.name,
        ckpt_dir=ckpt_dir if ckpt_dir is not None else Path(),
        weights=weights,
        prompt=prompt,
        size=size,
        frame_num=frame_num,
        sample_solver=solver,
        sample_steps=steps,
        sample_shift=shift,
        guide_scale=resolve_guide_scale(options.sample_guide_scale, cfg),
        base_seed=seed,
        save_file=save_file,
        # Upstream quirk kept: an empty negative prompt means the official one.
        negative_prompt=options.negative_prompt or None,
        image=image,
        offload_model=default_offload(options),
        convert_model_dtype=options.convert_model_dtype,
        quantize=check_quantize(options.quantize),
        # fp8 DiT files count as fp8 weights; unresolved files are checked once resolved (command.py)
        fp8_matmul=check_fp8_matmul(
            options.fp8_matmul, options.quantize, fp8_files=weights is None or weights.dit_fp8 is not None
        ),
        t5_cpu=options.t5_cpu,
        device=options.device,
        save_frames=save_frames,
        overwrite=options.overwrite,
        crf=options.crf,
        vae_tiled=options.vae_tiled,
        attention=options.attention,
        compile=check_compile(options.compile),
        gpu_memory=gpu_memory,
        cfg_batch=check_cfg_batch(options.cfg_batch),
        magcache=magcache,
        loras=resolve_loras(cfg, options.lora, options.lora_high, options.lora_low, options.lora_dir),
        distilled=recipe_name(options),
    )
    check_outputs(request)
    return request


def under_output_dir(output_dir: Path, save_file: Path) -> Path:
    """``save_file`` inside ``--output-dir`` (an absolute one stays where it is). The folder is created
    with the first output written; ``check_outputs`` checks before loading that it can be."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(
            f"--output-dir '{output_dir}' is a file, not a folder; pass a folder (created if missing)"
        )
    return save_file if save_file.is_absolute() else output_dir / save_file


def plan_settings(options: GenerateOptions) -> PlanSettings:
    """Validate only what ``--magcache-plan`` uses: task, solver, steps, shift, guide scales, the image (when
    given: it selects the curve) and the MagCache options."""
    cfg = task_config(options.task)
    options = apply_distilled(options)
    solver, steps, shift = check_sampling(
        cfg, options.sample_solver, options.sample_steps, options.sample_shift
    )
    check_limits(cfg, sample_steps=steps)
    if options.image is not None:
        check_image(options.image, cfg)
    magcache = magcache_options(dataclasses.replace(options, use_magcache=True), plan=True)
    has_image = options.image is not None or cfg.image == "required"
    guide_scale = resolve_guide_scale(options.sample_guide_scale, cfg)
    return PlanSettings(cfg, solver, steps, shift, has_image, magcache, guide_scale)


# ---------------------------------------------------------------------------------------------------
# Task and sampling settings


def task_config(task: str) -> TaskConfig:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    return TASKS[task]


def resolve_size(size: str | None, cfg: TaskConfig) -> str:
    """``W*H`` (``WxH`` accepted, since ``*`` needs quoting in a shell) among the task's supported sizes."""
    if size is None:
        return cfg.default_size
    key = re.sub(r"\s*[xX×]\s*", "*", size.strip())
    if key not in cfg.supported_sizes:
        problem = f"is not supported by {cfg.name}" if key in SIZES else "is not a size"
        note = (
            ""
            if cfg.image == "refused"
            else " (with --image it is an area budget; the image sets the aspect ratio)"
        )
        raise UserError(f"--size {size!r} {problem}; use one of {', '.join(cfg.supported_sizes)}{note}")
    return key


def check_frame_num(frame_num: int) -> int:
    if frame_num < 1 or (frame_num - 1) % 4:
        nearest = min(MAX_FRAME_NUM, max(1, 4 * round((frame_num - 1) / 4) + 1))  # a value that passes
        raise UserError(
            f"--frame-num {frame_num} is not of the form 4n+1 (the VAE packs 4 frames per latent); try {nearest}"
        )
    return frame_num


def check_limits(
    cfg: TaskConfig, *, size: str | None = None, frame_num: int | None = None, sample_steps: int | None = None
) -> None:
    """Upper bounds on what a run may ask for, checked before anything loads.

    Fixed maxima for now (``MAX_FRAME_NUM``, ``MAX_SAMPLE_STEPS``; the size is one of the task's
    supported sizes already). A memory planner can replace them with limits derived from the device:
    this is the one place that decides, and ``cfg`` and ``size`` are here for it.
    """
    if frame_num is not None and frame_num > MAX_FRAME_NUM:
        raise UserError(
            f"--frame-num {frame_num} is over the limit of {MAX_FRAME_NUM} frames; "
            "generate shorter clips (81 frames is 5 s at 16 fps)"
        )
    if sample_steps is not None and sample_steps > MAX_SAMPLE_STEPS:
        raise UserError(
            f"--sample-steps {sample_steps} is over the limit of {MAX_SAMPLE_STEPS}; "
            "the official runs use 40 (A14B) or 50 (ti2v-5B)"
        )


def check_sampling(
    cfg: TaskConfig, solver: str | None, steps: int | None, shift: float | None
) -> tuple[str, int, float]:
    solver = DEFAULT_SOLVER if solver is None else solver
    if solver not in SOLVERS:
        raise UserError(f"unknown --sample-solver {solver!r}; use one of {', '.join(SOLVERS)}")
    steps = cfg.sample_steps if steps is None else steps
    if steps < 1:
        raise UserError(f"--sample-steps {steps} must be at least 1 (the task default is {cfg.sample_steps})")
    shift = cfg.sample_shift if shift is None else float(shift)
    if not (math.isfinite(shift) and shift > 0):
        raise UserError(
            f"--sample-shift {shift} must be a number > 0 (the task default is {cfg.sample_shift})"
        )
    return solver, steps, shift


def resolve_guide_scale(value: str | float | Sequence[float] | None, cfg: TaskConfig) -> tuple[float, float]:
    """One value g -> (g, g); two values -> (low-noise, high-noise), upstream's tuple order."""
    if value is None:
        return cfg.guide_scale
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        scales = [float(p) for p in parts]
    except (TypeError, ValueError):
        scales = []
    if len(scales) not in (1, 2) or not all(math.isfinite(g) and g >= 0 for g in scales):
        raise UserError(
            f"--sample-guide-scale {value!r} must be one number or two (low-noise, high-noise), "
            "each >= 0, e.g. 5.0 or 3.0 4.0"
        )
    if len(scales) == 2 and not cfg.two_experts:
        raise UserError(
            f"--sample-guide-scale {value!r}: {cfg.name} has one model, so give one number (e.g. 5.0)"
        )
    return (scales[0], scales[-1])


def _resolve_seed(seed: int, rng: random.Random | None) -> int:
    if seed == -1:
        return (rng or random).randint(0, MAX_SEED)  # upstream: random.randint(0, sys.maxsize)
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--base-seed {seed} is out of range; use 0..{MAX_SEED}, or -1 for a random seed")
    return seed


def check_attention(name: str, device_type: str | None) -> None:
    """--attention must name a backend that is installed and runs on the device ("cpu", "cuda"; None
    for --device auto, checked again once the device is known, still before any weight loads)."""
    problem = backend_problem(name, device_type)
    if problem is None:
        return
    fix = (
        "install it, or use --attention auto"
        if not backend_installed(name)
        else "use --attention auto (flash and math also run on the CPU)"
    )
    raise UserError(f"--attention {name} {problem}; {fix}")


# ---------------------------------------------------------------------------------------------------
# MagCache options


def magcache_options(options: GenerateOptions, *, plan: bool = False) -> MagCacheOptions:
    """Validated MagCache settings; tuning flags without --use-magcache are refused rather than ignored."""
    given = [flag for field, flag in MAGCACHE_TUNING_FLAGS.items() if getattr(options, field) is not None]
    calibrate = options.magcache_calibrate
    if calibrate is not None and options.use_magcache and not plan:
        raise UserError(
            "--magcache-calibrate records ratios in a dense run, so it cannot be combined with --use-magcache; "
            "drop one of them"
        )
    if given and calibrate is not None and not plan:
        raise UserError(f"{given[0]} does not apply to --magcache-calibrate (a dense run); drop it")
    if given and not options.use_magcache:
        raise UserError(f"{given[0]} has no effect without --use-magcache; add --use-magcache (or drop it)")
    if options.magcache_verify and not options.use_magcache:
        raise UserError(
            "--magcache-verify compares a MagCache run with a dense one; add --use-magcache (or drop it)"
        )

    thresh, k, retention = options.magcache_thresh, options.magcache_k, options.retention_ratio
    mode = "aligned" if options.magcache_mode is None else options.magcache_mode
    defaults = MagCacheConfig()
    try:  # the ranges, and the rules across fields, are the policy's: one rule, one message each
        MagCacheConfig(
            thresh=defaults.thresh if thresh is None else thresh,
            K=defaults.K if k is None else k,
            retention=defaults.retention if retention is None else retention,
            mode=mode,
        )
    except MagCacheConfigError as err:
        raise UserError(err.named(MAGCACHE_SETTING_FLAGS[err.setting]) if err.setting else str(err)) from None
    speedup = options.magcache_speedup
    if speedup is not None and thresh is not None:
        raise UserError(
            "--magcache-speedup picks the threshold itself; drop --magcache-thresh or --magcache-speedup"
        )
    if speedup is not None and not (math.isfinite(speedup) and speedup > 1):
        raise UserError(
            f"--magcache-speedup {speedup} must be > 1 (the ideal speedup over a dense run, e.g. 1.5)"
        )
    if options.magcache_ratios is not None:
        check_ratios_file(options.magcache_ratios)
    return MagCacheOptions(
        enabled=options.use_magcache,
        mode=mode,
        thresh=thresh,
        K=k,
        retention_ratio=retention,
        ratios_file=options.magcache_ratios,
        calibrate_file=calibrate,
        speedup=speedup,
        verify=options.magcache_verify and not plan,
    )


def check_ratios_file(path: Path) -> None:
    from magcache_generate.magcache.ratios import RatiosFileError, load_ratios_file  # numpy: lazily

    try:
        load_ratios_file(path)
    except RatiosFileError as err:
        raise UserError(f"--magcache-ratios {err}") from None
