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
from wan.sampling import StaticModels, sample
from wan.schedule import make_schedule
from wan.testing.dit import random_transformer_state_dict, tiny_transformer_config


def build_models(task: str, dim: int, layers: int, seed: int = 0) -> StaticModels:
    cfg = TASKS[task]
    tcfg = tiny_transformer_config(
        cfg.model_type, dim=dim, num_layers=layers, ffn_dim=4 * dim, num_heads=dim // 32
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
    start = time.perf_counter()
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
    return time.perf_counter() - start


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
    parser.add_argument("--latent", default="3x16x16", help="F x H x W of the latent")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
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
    dense_s, cached_s = statistics.median(dense), statistics.median(cached)
    measured = dense_s / cached_s
    result = {
        "task": args.task,
        "image": has_image,
        "mode": args.mode,
        "steps": steps,
        "model": {"dim": args.dim, "layers": args.layers, "latent": list(latent)},
        "forwards": plan.forwards,
        "dense_forwards": plan.dense_forwards,
        "ideal_speedup": round(plan.ideal_speedup, 4),
        "dense_s": round(dense_s, 3),
        "magcache_s": round(cached_s, 3),
        "measured_speedup": round(measured, 4),
        "fraction_of_ideal": round(measured / plan.ideal_speedup, 4),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
