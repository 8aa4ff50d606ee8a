"""MagCache: a pure skip policy (policy.py), per-run plans (plan.py), the official curves (ratios.py),
the residual cache the transformer calls around its block stack (residual_cache.py) and calibration.

Names are re-exported lazily so that planning (`--magcache-plan`) never imports torch.
"""

from importlib import import_module

_EXPORTS = {
    "MagCacheConfig": "policy",
    "BranchState": "policy",
    "decide": "policy",
    "Plan": "plan",
    "plan": "plan",
    "plan_json": "report",
    "render_plan": "report",
    "threshold_for_speedup": "plan",
    "MagCurve": "ratios",
    "official_curve": "ratios",
    "load_ratios_file": "ratios",
    "ResidualCache": "residual_cache",
    "NoCache": "residual_cache",
    "CalibrationRecorder": "calibration",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"magcache_generate.magcache.{_EXPORTS[name]}"), name)
    raise AttributeError(name)
