"""MagCache settings of a request -> the plan of a run. Torch-free: `--magcache-plan` uses it too."""

from __future__ import annotations

from collections.abc import Callable

from magcache_generate.magcache.plan import Plan, plan, preset_config, threshold_for_speedup
from magcache_generate.magcache.policy import MagCacheConfig
from magcache_generate.magcache.ratios import MagCurve, load_ratios_file, official_curve
from magcache_generate.request import MagCacheOptions
from wan.configs import TASKS
from wan.guidance import expert_branches


def magcache_config(task: str, options: MagCacheOptions) -> MagCacheConfig:
    """The request's settings, each unset one taken from the task preset (upstream README values)."""
    preset = preset_config(task, options.mode)
    return MagCacheConfig(
        thresh=options.thresh if options.thresh is not None else preset.thresh,
        K=options.K if options.K is not None else preset.K,
        retention=options.retention_ratio if options.retention_ratio is not None else preset.retention,
        mode=options.mode,
    )


def magcache_curve(task: str, options: MagCacheOptions, has_image: bool) -> MagCurve:
    if options.ratios_file is not None:
        return load_ratios_file(options.ratios_file)
    return official_curve(task, has_image)


def make_plan(
    task: str,
    timesteps: list[int],
    shift: float,
    options: MagCacheOptions,
    has_image: bool,
    log: Callable[[str], None] = print,
    *,
    guide_scale: tuple[float, float] | None = None,
) -> Plan:
    """The schedule of every DiT call; with `options.speedup`, the smallest threshold reaching it.

    `guide_scale` (low, high; default the task's): experts at scale 1 run the conditional forward only.
    """
    cfg = TASKS[task]
    boundary = cfg.boundary
    experts = ("high", "low") if cfg.two_experts else ("single",)
    branches = expert_branches(experts, cfg.guide_scale if guide_scale is None else guide_scale)
    config = magcache_config(task, options)
    curve = magcache_curve(task, options, has_image)
    if options.speedup is not None:
        thresh = threshold_for_speedup(
            options.speedup, task, timesteps, boundary, config, curve, shift=shift, branches=branches
        )
        config = MagCacheConfig(thresh=thresh, K=config.K, retention=config.retention, mode=config.mode)
        log(f"MagCache: --magcache-speedup {options.speedup:g} -> threshold {thresh:.6g}")
    # warnings and the no-skip reason are part of the plan; render_plan shows them (once)
    return plan(task, timesteps, boundary, config, curve, shift=shift, has_image=has_image, branches=branches)
