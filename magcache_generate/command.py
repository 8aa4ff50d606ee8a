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
from magcache_generate.parallel import ParallelOptions, check_parallel, is_main_rank, quiet_console
from magcache_generate.plan_check import check_magcache_plan, print_plan
from magcache_generate.request import UserError
from magcache_generate.validate import GenerateOptions, build_request, plan_settings, task_config

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
    parallel: ParallelOptions | None = None,
) -> int:
    """Validate everything, then plan (``plan``) or generate; returns the exit code."""
    from magcache_generate.progress import make_console

    started = time.perf_counter()
    console = quiet_console(make_console())  # under torchrun only rank 0 prints
    if as_json and not plan:
        raise UserError("--json only applies to --magcache-plan; drop it or add --magcache-plan")
    if plan:
        print_plan(plan_settings(options), as_json=as_json)
        return 0
    if demo and options.ckpt_dir is not None:
        raise UserError("--demo builds its own tiny checkpoint; drop --ckpt-dir (or --demo)")
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
    parallel = parallel or ParallelOptions()
    uses_cfg = any(g != 1 for r in requests for g in r.guide_scale)
    calibrate = requests[0].magcache.calibrate_file is not None
    layout = check_parallel(parallel, uses_cfg=uses_cfg, prompt_file=batch is not None, calibrate=calibrate)
    for note in fast_path_notes(options, requests[0], check_magcache_plan(requests[0])):
        console.print(note, soft_wrap=True)  # before anything loads

    cfg = task_config(options.task)
    if demo:
        from magcache_generate.demo import demo_checkpoint

        message = "[yellow]--demo: tiny RANDOM weights; the video will be noise, not a real generation[/]"
        console.print(message)
        ckpt_dir = demo_checkpoint(cfg.name)
    else:
        ckpt_dir = options.ckpt_dir
    from magcache_generate.preflight import check_before_loading

    ckpt_dir = check_before_loading(ckpt_dir, cfg, options.device)
    check_loras(requests[0].loras, ckpt_dir, cfg)  # headers only, before any weight loads
    requests = [dataclasses.replace(r, ckpt_dir=ckpt_dir) for r in requests]
    if layout.distributed:  # the heads are known now (the checkpoint's config), still before loading
        from magcache_generate.parallel_run import dit_heads, run_parallel

        check_parallel(
            parallel, uses_cfg=uses_cfg, prompt_file=batch is not None, num_heads=dit_heads(ckpt_dir, cfg)
        )
        return run_parallel(
            layout, parallel, requests, random_seeds, batch, console=console, debug=debug, started=started
        )
    print_random_seeds(console, requests, random_seeds)

    from magcache_generate.run import run_requests  # torch and the models: only now

    if batch is None:
        results = run_requests(requests, console=console, debug=debug)
        failed = [r for r in results if isinstance(r, dict) and r.get("error")]
        return EXIT_FAILURE if failed else 0
    from magcache_generate.batch import batch_exit_code, batch_rows
    from magcache_generate.progress import print_batch

    results = run_requests(requests, console=console, debug=debug, batch=True)
    rows = batch_rows(batch.entries, batch.problems, results)
    print_batch(console, rows, time.perf_counter() - started)
    return batch_exit_code(rows)


def print_random_seeds(console, requests: list, random_seeds: list[bool]) -> None:
    """Say each seed that was drawn at random, so the video can be repeated."""
    for request, was_random in zip(requests, random_seeds, strict=True):
        if was_random:
            console.print(
                f"seed {request.base_seed} (random; --base-seed {request.base_seed} repeats it) "
                f"for {request.save_file}",
                markup=False,
            )


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
    for problem in problems if is_main_rank() else ():
        typer.echo(f"skipped: {prompt_file} {problem}", err=True)
    if not entries:
        raise UserError(f"--prompt-file '{prompt_file}' has no valid item; fix the lines reported above")
    return Batch(entries, problems)
