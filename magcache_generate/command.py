"""What one generate invocation does once its options are parsed: validate everything, then print the
MagCache plan or generate (one video, or a --prompt-file batch), and say with which exit code."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from magcache_generate.fast_path import fast_path_notes
from magcache_generate.loras import check_loras
from magcache_generate.options import GenerateOptions
from magcache_generate.parallel import ParallelOptions, check_parallel, is_main_rank, quiet_console
from magcache_generate.plan_check import check_magcache_plan, print_plan
from magcache_generate.request import UserError
from magcache_generate.validate import build_request, plan_settings, task_config

if TYPE_CHECKING:
    from magcache_generate.batch import Batch

EXIT_FAILURE = 1  # a run (or a batch item) failed after loading


def run_command(options: GenerateOptions) -> int:
    """Validate everything, then print the MagCache plan (--magcache-plan) or generate; returns the
    exit code."""
    from magcache_generate.progress import make_console

    started = time.perf_counter()
    console = quiet_console(make_console())  # under torchrun only rank 0 prints
    demo, prompt_file, debug = options.demo, options.prompt_file, options.debug
    if options.as_json and not options.magcache_plan:
        raise UserError("--json only applies to --magcache-plan; drop it or add --magcache-plan")
    if options.magcache_plan:
        print_plan(plan_settings(options), as_json=options.as_json)
        return 0
    if demo and options.ckpt_dir is not None:
        raise UserError("--demo builds its own tiny checkpoint; drop --ckpt-dir (or --demo)")
    defaults = demo_defaults(options.task) if demo else None  # under the distilled recipe's
    batch = None
    if prompt_file is not None:
        batch = batch_requests(options, prompt_file, defaults)
        requests = [e.request for e in batch.entries]
        random_seeds = [e.random_seed for e in batch.entries]
        magcache = [e.magcache for e in batch.entries]
    else:
        requests = [build_request(options, check_checkpoint=False, defaults=defaults)]
        random_seeds = [options.base_seed == -1]
        magcache = [check_magcache_plan(requests[0])]
    parallel = ParallelOptions(options.ulysses_size, options.cfg_parallel, options.dit_fsdp, options.t5_fsdp)
    uses_cfg = any(g != 1 for r in requests for g in r.guide_scale)
    calibrate = requests[0].magcache.calibrate_file is not None
    layout = check_parallel(parallel, uses_cfg=uses_cfg, prompt_file=batch is not None, calibrate=calibrate)
    for note in fast_path_notes(options, requests[0], magcache[0]):
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

        heads = dit_heads(ckpt_dir, cfg)
        check_parallel(
            parallel, uses_cfg=uses_cfg, prompt_file=batch is not None, calibrate=calibrate, num_heads=heads
        )
        return run_parallel(
            layout,
            parallel,
            requests,
            random_seeds,
            magcache,
            batch,
            console=console,
            debug=debug,
            started=started,
        )
    print_random_seeds(console, requests, random_seeds)

    from magcache_generate.run import run_requests  # torch and the models: only now

    if batch is None:  # one video: a failure raises (and is reported by the caller)
        run_requests(requests, console=console, debug=debug, magcache=magcache)
        return 0
    from magcache_generate.batch import batch_exit_code, batch_rows
    from magcache_generate.progress import print_batch

    results = run_requests(requests, console=console, debug=debug, batch=True, magcache=magcache)
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


def demo_defaults(task: str) -> dict[str, object]:
    """The demo's small size, frame count and step count, for the options the user (and the distilled
    recipe) left unset."""
    from magcache_generate.demo import DEMO_OVERRIDES, DEMO_SIZES

    return {**DEMO_OVERRIDES, **({"size": DEMO_SIZES[task]} if task in DEMO_SIZES else {})}


def batch_requests(options: GenerateOptions, prompt_file: Path, defaults: dict[str, object] | None) -> Batch:
    """The prompt file's runnable items, each with its MagCache plan; bad ones are reported on stderr
    (and kept as problems)."""
    from magcache_generate.batch import Batch, BatchProblem, build_batch

    if options.prompt is not None:
        raise UserError("--prompt and --prompt-file exclude each other; put the prompt into the file")
    if options.save_file is not None:
        raise UserError("--save-file names one video; with --prompt-file set save_file per line (JSON Lines)")
    batch = build_batch(options, prompt_file, defaults=defaults)
    entries, problems = [], list(batch.problems)
    for entry in batch.entries:
        try:
            plan = check_magcache_plan(entry.request)
        except UserError as err:
            problems.append(BatchProblem(entry.line, str(err), entry.number))
            continue
        entries.append(dataclasses.replace(entry, magcache=plan))
    problems.sort(key=lambda p: p.line)
    for problem in problems if is_main_rank() else ():
        typer.echo(f"skipped: {prompt_file} {problem}", err=True)
    if not entries:
        raise UserError(f"--prompt-file '{prompt_file}' has no valid item; fix the lines reported above")
    return Batch(entries, problems)
