"""Dense vs MagCache denoising time on a small random-weight model, against the ideal speedup.

    python benchmarks/magcache_speedup.py --task t2v-A14B
    python benchmarks/magcache_speedup.py --task ti2v-5B --image --json
    python benchmarks/magcache_speedup.py --task i2v-A14B --mode official --steps 40

Times only the sampling loop (both CFG branches, expert switch, solver), with the task's default
steps, shift and MagCache preset. Like the real models (30-40 layers), the model is deep enough that
the block stack dominates a forward; the non-block work (embeddings, head, solver) is what keeps the
measured speedup below the ideal one (dense forwards / computed forwards).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from magcache_generate.magcache.residual_cache import ResidualCache
from magcache_generate.magcache.session import make_plan
from magcache_generate.request import MagCacheOptions
from wan.conditioning import Conditioning
from wan.configs import TASKS
from wan.modules.transformer import WanTransformer
from wan.sampling import sample
from wan.schedule import make_schedule
from wan.testing.dit import random_transformer_state_dict, tiny_transformer_config
from wan.testing.models import StaticModels


def build_models(task: str, dim: int, layers: int, seed: int = 0) -> StaticModels:
    cfg = TASKS[task]
    tcfg = tiny_transformer_config(
        cfg.model_type, dim=dim, num_layers=layers, ffn_dim=4 * dim, num_heads=dim // 32, text_len=32
    )
    names = ("high", "low") if cfg.two_experts else ("single",)
    models = {}
    for i, name in enumerate(names):
        model = WanTransformer(tcfg)
        model.load_state_dict(random_transformer_state_dict(tcfg, seed + i))
        models[name] = model.eval().requires_grad_(False)
    return StaticModels(models)


def run(task: str, models: StaticModels, steps: int, latent: tuple[int, int, int], cache, image: bool):
    cfg = TASKS[task]
    tcfg = next(iter(models.models.values())).config
    f, h, w = latent
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, tcfg.out_dim, f, h, w, generator=gen)
    context = torch.randn(1, 12, tcfg.text_dim, generator=gen)
    context_null = torch.randn(1, 20, tcfg.text_dim, generator=gen)
    conditioning = Conditioning()
    if cfg.name == "i2v-A14B":
        conditioning = Conditioning(y=torch.randn(1, 20, f, h, w, generator=gen))
    elif image:
        conditioning = Conditioning(first_frame=torch.randn(1, tcfg.out_dim, 1, h, w, generator=gen))
    schedule = make_schedule("unipc", steps, cfg.sample_shift)
    start, start_cpu = time.perf_counter(), time.process_time()
    sample(
        noise,
        schedule,
        models,
        context,
        context_null,
        guide_scale=cfg.guide_scale,
        boundary=cfg.boundary,
        conditioning=conditioning,
        cache=cache,
    )
    return time.perf_counter() - start, time.process_time() - start_cpu


class _SkipAll:
    """Reuses a fixed residual on every call: what a skipped forward costs."""

    def __init__(self, residual: torch.Tensor):
        self.residual = residual

    def run(self, h: torch.Tensor, blocks) -> torch.Tensor:
        return h + self.residual


def per_call_costs(
    models: StaticModels, latent: tuple[int, int, int], pairs: int = 30
) -> tuple[float, float]:
    """Median CPU seconds of a computed and of a skipped forward, timed in strict alternation so that
    slow phases of a shared machine hit both alike."""
    model = next(iter(models.models.values()))
    cfg = model.config
    f, h, w = latent
    x = torch.randn(1, 16 if cfg.model_type == "i2v" else cfg.out_dim, f, h, w)
    y = torch.randn(1, 20, f, h, w) if cfg.model_type == "i2v" else None
    ctx = torch.randn(1, 12, cfg.text_dim)
    t = torch.tensor([900])
    skip = _SkipAll(torch.zeros(1, f * h * w // 4, cfg.dim))
    full, skipped = [], []
    for _ in range(pairs):
        for cache, out in ((None, full), (skip, skipped)):
            start = time.process_time()
            model(x, t, ctx, y, cache=cache)
            out.append(time.process_time() - start)
    return statistics.median(full), statistics.median(skipped)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=TASKS, default="t2v-A14B")
    parser.add_argument("--mode", choices=("aligned", "official"), default="aligned")
    parser.add_argument("--steps", type=int, help="default: the task's")
    parser.add_argument("--image", action="store_true", help="ti2v-5B with an image (i2v curve)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--latent", default="3x24x24", help="F x H x W of the latent")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is the steadiest on a shared VM)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TASKS[args.task]
    steps = args.steps or cfg.sample_steps
    has_image = args.image or args.task == "i2v-A14B"
    latent = tuple(int(v) for v in args.latent.split("x"))
    models = build_models(args.task, args.dim, args.layers)
    schedule = make_schedule("unipc", steps, cfg.sample_shift)
    timesteps = [int(t) for t in schedule.timesteps[: len(schedule)]]
    options = MagCacheOptions(enabled=True, mode=args.mode)
    plan = make_plan(args.task, timesteps, cfg.sample_shift, options, has_image, log=lambda _: None)
    with torch.inference_mode():
        run(args.task, models, 2, latent, None, has_image)  # warm-up
        dense, cached = [], []
        for _ in range(args.repeat):  # interleaved so load changes hit both alike
            dense.append(run(args.task, models, steps, latent, None, has_image))
            cached.append(run(args.task, models, steps, latent, ResidualCache(plan), has_image))
    # Wall time on a shared VM swings by +-30% from run to run (CPU steal); process CPU time of a
    # single-threaded run does not, so the speedup is measured on CPU time (wall medians also shown).
    dense_s = statistics.median(d[1] for d in dense)
    cached_s = statistics.median(c[1] for c in cached)
    wall = statistics.median(d[0] for d in dense) / statistics.median(c[0] for c in cached)
    measured = dense_s / cached_s
    with torch.inference_mode():
        t_full, t_skip = per_call_costs(models, latent)
    # dense / cached from per-call costs (solver and CFG arithmetic are negligible here)
    from_calls = (
        plan.dense_forwards
        * t_full
        / (plan.forwards * t_full + (plan.dense_forwards - plan.forwards) * t_skip)
    )
    result = {
        "task": args.task,
        "image": has_image,
        "mode": args.mode,
        "steps": steps,
        "model": {"dim": args.dim, "layers": args.layers, "latent": list(latent)},
        "forwards": plan.forwards,
        "dense_forwards": plan.dense_forwards,
        "ideal_speedup": round(plan.ideal_speedup, 4),
        "dense_cpu_s": round(dense_s, 3),
        "magcache_cpu_s": round(cached_s, 3),
        "wall_speedup": round(wall, 4),
        "measured_speedup": round(measured, 4),
        "fraction_of_ideal": round(measured / plan.ideal_speedup, 4),
        "computed_forward_cpu_ms": round(1000 * t_full, 2),
        "skipped_forward_cpu_ms": round(1000 * t_skip, 2),
        "speedup_from_call_costs": round(from_calls, 4),
        "fraction_of_ideal_from_call_costs": round(from_calls / plan.ideal_speedup, 4),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
