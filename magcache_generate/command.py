"""What one generate invocation does once its options are parsed: validate everything, then print the
MagCache plan or generate (one video, or a --prompt-file batch), and say with which exit code."""

from __future__ import annotations

import dataclasses
import textwrap
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
from magcache_generate.startup import StartupClock
from magcache_generate.validate import build_request, part_options, plan_settings, task_config
from magcache_generate.weight_paths import WeightPaths, resolve_weight_paths

if TYPE_CHECKING:
    from magcache_generate.batch import Batch

EXIT_FAILURE = 1  # a run (or a batch item) failed after loading


def run_command(options: GenerateOptions) -> int:
    """Validate everything, then print the MagCache plan (--magcache-plan) or generate; returns the
    exit code."""
    from magcache_generate.progress import make_console, print_message

    startup = StartupClock()  # time to first step, from the process's start
    started = time.perf_counter()
    console = quiet_console(make_console())  # under torchrun only rank 0 prints
    if options.settings_from is not None:  # the stored settings, under the options given
        from magcache_generate.reproduce import apply_settings, read_settings

        options = apply_settings(options, read_settings(options.settings_from))
    demo, prompt_file, debug = options.demo, options.prompt_file, options.debug
    if options.as_json and not options.magcache_plan:
        raise UserError("--json only applies to --magcache-plan; drop it or add --magcache-plan")
    if options.magcache_plan:
        from magcache_generate.compile_choice import planned_choice
        from magcache_generate.gpu_plan import print_card_plan

        settings = plan_settings(options)
        compile_choice = planned_choice(options, settings)
        memory = print_card_plan(options, as_json=options.as_json)  # with --gpu-memory GB: that card's
        if options.as_json or options.gpu_memory is None or options.use_magcache:
            print_plan(settings, as_json=options.as_json, memory=memory, compile_choice=compile_choice)
        if not options.as_json:
            typer.echo(textwrap.fill(f"compile: {compile_choice.text()}", width=100, subsequent_indent="  "))
        return 0
    check_budget_has_gpu(options)  # before anything is printed
    if demo and (options.ckpt_dir is not None or part_options(options).any):
        raise UserError(
            "--demo builds its own tiny checkpoint; drop --ckpt-dir and the weight files (or --demo)"
        )
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
    offload = requests[0].offload_model
    layout = check_parallel(
        parallel, uses_cfg=uses_cfg, prompt_file=batch is not None, calibrate=calibrate, offload=offload
    )
    for note in fast_path_notes(options, requests[0], magcache[0]):
        print_message(console, note)  # before anything loads

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
    numbers = [e.number for e in batch.entries] if batch is not None else None
    startup.mark("validated")
    if layout.distributed:  # the heads are known now (the checkpoint's config), still before loading
        from magcache_generate.parallel_run import dit_heads, run_parallel

        heads = dit_heads(weights, cfg)
        check_parallel(
            parallel,
            uses_cfg=uses_cfg,
            prompt_file=batch is not None,
            calibrate=calibrate,
            offload=offload,
            num_heads=heads,
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
            startup=startup,
        )
    print_random_seeds(console, requests, random_seeds, numbers)

    from magcache_generate.run import run_requests  # torch and the models: only now

    startup.mark("runtime_imported")

    if batch is None:  # one video: a failure raises (and is reported by the caller)
        run_requests(requests, console=console, debug=debug, magcache=magcache, startup=startup)
        return 0
    from magcache_generate.batch import batch_exit_code, batch_rows
    from magcache_generate.progress import print_batch

    results = run_requests(
        requests, console=console, debug=debug, batch=True, magcache=magcache, startup=startup
    )
    rows = batch_rows(batch.entries, batch.problems, results)
    print_batch(console, rows, time.perf_counter() - started)
    return batch_exit_code(rows)


def check_budget_has_gpu(options: GenerateOptions) -> None:
    """A `--gpu-memory` budget on a machine without a CUDA device is refused before anything prints; the
    plan for a card of that size is one flag away."""
    from magcache_generate.budget import parse_gpu_memory

    given = parse_gpu_memory(options.gpu_memory)
    if given is None or options.device == "cpu":  # a --device cpu run is refused by its validation
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"--gpu-memory {given:g} applies to GPU runs, and this machine has no CUDA device; drop it, "
            "or add --magcache-plan to see the memory plan for such a card"
        )


def print_random_seeds(
    console, requests: list, random_seeds: list[bool], numbers: list[int] | None = None
) -> None:
    """Say each seed that was drawn at random, so the video can be repeated. `numbers`: a batch's item
    numbers (None: one video)."""
    items = numbers if numbers is not None else [None] * len(requests)
    for request, was_random, number in zip(requests, random_seeds, items, strict=True):
        if was_random:
            console.print(
                f"seed {request.base_seed} (random; --base-seed {request.base_seed} repeats it)"
                + (f" for item {number:03d}" if number is not None else ""),
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
