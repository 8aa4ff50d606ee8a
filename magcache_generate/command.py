"""What one generate invocation does once its options are parsed: validate everything, then print the
MagCache plan or generate (one video, or a --prompt-file batch), and say with which exit code."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from magcache_generate.distilled import apply_distilled
from magcache_generate.fast_path import fast_path_notes
from magcache_generate.loras import check_loras
from magcache_generate.plan_check import check_magcache_plan, print_plan
from magcache_generate.request import UserError
from magcache_generate.startup import StartupClock
from magcache_generate.validate import (
    GenerateOptions,
    build_request,
    part_options,
    plan_settings,
    task_config,
)
from magcache_generate.weight_paths import WeightPaths, resolve_weight_paths

if TYPE_CHECKING:
    from magcache_generate.batch import Batch

EXIT_FAILURE = 1  # a run (or a batch item) failed after loading


def run_command(
    options: GenerateOptions,
    *,
    prompt_file: Path | None = None,
    demo: bool = False,
    plan: bool = False,
    as_json: bool = False,
    debug: bool = False,
) -> int:
    """Validate everything, then plan (``plan``) or generate; returns the exit code."""
    from magcache_generate.progress import make_console

    startup = StartupClock()  # time to first step, from the process's start
    started = time.perf_counter()
    console = make_console()
    if as_json and not plan:
        raise UserError("--json only applies to --magcache-plan; drop it or add --magcache-plan")
    if plan:
        print_plan(plan_settings(options), as_json=as_json)
        return 0
    if demo and (options.ckpt_dir is not None or part_options(options).any):
        raise UserError(
            "--demo builds its own tiny checkpoint; drop --ckpt-dir and the weight files (or --demo)"
        )
    options = apply_distilled(options)  # before the demo's defaults: the recipe's step count wins
    if demo:
        options = with_demo_defaults(options)
    batch = None
    if prompt_file is not None:
        batch = batch_requests(options, prompt_file)
        requests = [e.request for e in batch.entries]
        random_seeds = [e.random_seed for e in batch.entries]
    else:
        requests = [build_request(options, check_checkpoint=False)]
        random_seeds = [options.base_seed == -1]
    for note in fast_path_notes(options, requests[0], check_magcache_plan(requests[0])):
        console.print(note, soft_wrap=True)  # before anything loads

    cfg = task_config(options.task)
    if demo:
        from magcache_generate.demo import demo_checkpoint

        message = "[yellow]--demo: tiny RANDOM weights; the video will be noise, not a real generation[/]"
        console.print(message)
        weights = WeightPaths.official(demo_checkpoint(cfg.name), cfg)
    else:  # --ckpt-dir, each part overridable by --dit/--dit-high/--dit-low/--t5/--vae/--tokenizer
        weights = resolve_weight_paths(options.ckpt_dir, part_options(options), cfg)
    from magcache_generate.preflight import check_before_loading
    from magcache_generate.quantization import check_fp8_matmul

    weights = check_before_loading(weights, cfg, options.device)
    check_fp8_matmul(options.fp8_matmul, options.quantize, fp8_files=weights.dit_fp8 is not None)
    check_loras(requests[0].loras, weights, cfg)  # headers only, before any weight loads
    requests = [dataclasses.replace(r, ckpt_dir=weights.root or Path(), weights=weights) for r in requests]
    for request, was_random in zip(requests, random_seeds, strict=True):
        if was_random:
            console.print(
                f"seed {request.base_seed} (random; --base-seed {request.base_seed} repeats it) "
                f"for {request.save_file}",
                markup=False,
            )

    startup.mark("validated")
    from magcache_generate.run import run_requests  # torch and the models: only now

    startup.mark("runtime_imported")

    if batch is None:
        results = run_requests(requests, console=console, debug=debug, startup=startup)
        failed = [r for r in results if isinstance(r, dict) and r.get("error")]
        return EXIT_FAILURE if failed else 0
    from magcache_generate.batch import batch_exit_code, batch_rows
    from magcache_generate.progress import print_batch

    results = run_requests(requests, console=console, debug=debug, batch=True, startup=startup)
    rows = batch_rows(batch.entries, batch.problems, results)
    print_batch(console, rows, time.perf_counter() - started)
    return batch_exit_code(rows)


def with_demo_defaults(options: GenerateOptions) -> GenerateOptions:
    """The demo's small size, frame count and step count, where the user gave none."""
    from magcache_generate.demo import DEMO_OVERRIDES, DEMO_SIZES

    defaults = {k: v for k, v in DEMO_OVERRIDES.items() if getattr(options, k) is None}
    if options.size is None and options.task in DEMO_SIZES:
        defaults["size"] = DEMO_SIZES[options.task]
    return dataclasses.replace(options, **defaults)


def batch_requests(options: GenerateOptions, prompt_file: Path) -> Batch:
    """The prompt file's runnable items; bad ones are reported on stderr (and kept as problems)."""
    from magcache_generate.batch import Batch, BatchProblem, build_batch

    if options.prompt is not None:
        raise UserError("--prompt and --prompt-file exclude each other; put the prompt into the file")
    if options.save_file is not None:
        raise UserError("--save-file names one video; with --prompt-file set save_file per line (JSON Lines)")
    batch = build_batch(options, prompt_file)
    entries, problems = [], list(batch.problems)
    for entry in batch.entries:
        try:
            check_magcache_plan(entry.request)
        except UserError as err:
            problems.append(BatchProblem(entry.line, str(err), entry.number))
            continue
        entries.append(entry)
    problems.sort(key=lambda p: p.line)
    for problem in problems:
        typer.echo(f"skipped: {prompt_file} {problem}", err=True)
    if not entries:
        raise UserError(f"--prompt-file '{prompt_file}' has no valid item; fix the lines reported above")
    return Batch(entries, problems)
