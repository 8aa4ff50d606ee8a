"""A CPU run says so with an estimate of its denoising time; the progress bar's ETA shows after one step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from rich.progress import Progress

from magcache_generate.cpu_estimate import cpu_notice, forward_flops, forwards_of, tokens_of
from magcache_generate.plan_check import build_plan, plan_settings_for
from magcache_generate.progress import StepEtaColumn
from magcache_generate.validate import GenerateOptions, build_request
from wan.testing.real_width import real_transformer_config

ROOT = Path(__file__).resolve().parents[1]


def _bench_transformer():
    spec = importlib.util.spec_from_file_location(
        "bench_transformer", ROOT / "benchmarks" / "bench_transformer.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_transformer"] = module
    spec.loader.exec_module(module)
    return module


def test_flops_agree_with_the_benchmark_count():
    cfg = real_transformer_config("t2v-A14B")
    request = build_request(GenerateOptions(size="832*480", frame_num=81), check_checkpoint=False)
    tokens = tokens_of(request, cfg)
    assert tokens == 21 * 30 * 52
    bench = _bench_transformer()
    expected = cfg.num_layers * bench.block_flops(tokens, cfg.dim, cfg.ffn_dim, cfg.text_len)
    expected += bench.fixed_flops(cfg, tokens)
    assert forward_flops(tokens, cfg) == expected


def test_forwards_follow_cfg_and_magcache():
    dense = build_request(GenerateOptions(), check_checkpoint=False)
    assert forwards_of(dense, None) == 80  # 40 steps x cond + uncond
    free = build_request(GenerateOptions(sample_guide_scale="1,1"), check_checkpoint=False)
    assert forwards_of(free, None) == 40
    cached = build_request(GenerateOptions(use_magcache=True), check_checkpoint=False)
    assert forwards_of(cached, build_plan(plan_settings_for(cached))) == 52


def test_notice_names_the_cpu_and_labels_an_estimate():
    cfg = real_transformer_config("t2v-A14B")
    request = build_request(GenerateOptions(size="832*480", device="cpu"), check_checkpoint=False)
    line = cpu_notice([request], [None], cfg, "cpu")
    assert line.startswith("CPU run (--device cpu): denoising takes about ")
    assert "(estimate: " in line and "GFLOP/s" in line and len(line) <= 100
    assert "CPU run (no CUDA device found)" in cpu_notice([request], [None], cfg, "auto")


def test_eta_shows_once_a_step_has_finished():
    now = [0.0]
    progress = Progress(get_time=lambda: now[0])
    task_id = progress.add_task("denoise", total=10)
    task = progress.tasks[0]
    column = StepEtaColumn()
    now[0] = 5.0
    assert column.render(task).plain == "-:--:--"
    now[0] = 60.0
    progress.update(task_id, advance=1)  # one minute-long step
    assert column.render(task).plain == "0:09:00"
    now[0] = 150.0
    progress.update(task_id, advance=1)
    assert column.render(task).plain == "0:10:00"  # 75 s a step, 8 left
