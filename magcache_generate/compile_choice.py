"""`--compile auto|on|off`: whether the DiT block runs through torch.compile, decided once per run.

- `off`: never; `on`: always (also on the CPU, where it is allowed for testing);
- `auto` (default): off on the CPU; on CUDA, on when the run's forwards save more time than compiling
  costs. The saving per forward and the compile time are the measured figures below; a run compiles
  once per video size (every block, both experts and every batch item share the compiled graph), and
  later runs reuse PyTorch's on-disk cache (`cache_dir`, `dit_runtime.use_compile_cache`), so the cold compile time counted here is
  an upper bound for a repeated size.

The rule's constants are in this one place, with where they were measured. Torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magcache_generate.request import UserError

if TYPE_CHECKING:
    from magcache_generate.magcache.plan import Plan
    from magcache_generate.options import GenerateOptions
    from magcache_generate.request import Request
    from magcache_generate.validate import PlanSettings

MODES = ("auto", "on", "off")
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # PyTorch's variable for its compile cache folder

# Measured on one H100 80 GB HBM3, torch 2.11.0+cu130, 2026-11-26, real-width random A14B weights in bf16
# (benchmarks/README.md, "Measured on one H100"): `bench_transformer.py` eager (attention auto = cuDNN)
# against `--compile`, per block, and the compile time of the 480p part (both block signatures, a cold
# cache; that run still had graph breaks the compiled fractions' run no longer had). The GPU check's
# `compile_repays_...` row re-measures both figures (`rule_figures`).
MEASURED_ON = "one H100, 2026-11-26"
MEASURED_DIM = 5120  # A14B width
COMPILE_SECONDS = 20.2  # per video size
# (tokens, eager s/block, eager fraction of the matmul rate, compiled fraction): 832x480x81, 1280x720x81
MEASURED_BLOCKS = ((32_760, 0.0823, 0.651, 0.820), (75_600, 0.306, 0.684, 0.743))


def measured_savings() -> list[tuple[int, float]]:
    """(tokens, seconds a compiled block saved against eager) at each measured shape."""
    return [(t, eager - eager * f_eager / f_compiled) for t, eager, f_eager, f_compiled in MEASURED_BLOCKS]


def saved_seconds_per_block(tokens: int, dim: int) -> float:
    """Seconds one compiled block saves against eager, per forward: piecewise linear in tokens through
    zero and the measured points (past the last one, along its last segment), scaled by the width (what
    compiling saves is fused element-wise work, which grows with tokens x width)."""
    points = [(0, 0.0), *measured_savings()]
    segment = next((i for i in range(1, len(points)) if tokens <= points[i][0]), len(points) - 1)
    (t0, s0), (t1, s1) = points[segment - 1], points[segment]
    return max(s0 + (s1 - s0) * (tokens - t0) / (t1 - t0), 0.0) * dim / MEASURED_DIM


def cache_dir(environ: Mapping[str, str]) -> Path:
    """Where compiled graphs are kept across runs: PyTorch's own TORCHINDUCTOR_CACHE_DIR when set, else
    magcache-generate's folder in the user's cache ($XDG_CACHE_HOME, default ~/.cache), which unlike
    PyTorch's default under /tmp survives a reboot."""
    if environ.get(CACHE_ENV):
        return Path(environ[CACHE_ENV])
    base = Path(environ["XDG_CACHE_HOME"]) if environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "magcache-generate" / "torchinductor"


def check_compile(value: str) -> str:
    """`--compile` must be auto, on or off."""
    if value not in MODES:
        raise UserError(
            f"--compile {value!r} is not one of {', '.join(MODES)}; use auto (default), on or off"
        )
    return value


@dataclass(frozen=True)
class CompileChoice:
    """The run's decision, as the plan, the summary and the sidecar state it."""

    requested: str  # auto | on | off
    enabled: bool
    reason: str

    def text(self) -> str:
        return summary_text(self.to_json())

    def to_json(self) -> dict[str, Any]:
        record = {"requested": self.requested, "enabled": self.enabled, "reason": self.reason}
        if self.reason.startswith("auto: ") and "forwards" in self.reason:
            record["figures_from"] = f"compile time and per-block saving measured on {MEASURED_ON}"
        return record


@dataclass(frozen=True)
class CompileWork:
    """What one request asks of the DiT: its forwards, at how many tokens, through how many blocks."""

    forwards: float
    tokens: int
    blocks: int
    dim: int


def decide_compile(mode: str, device_type: str, work: Sequence[CompileWork]) -> CompileChoice:
    """The run's compile decision from `--compile`, the device type and each request's DiT work."""
    if mode == "off":
        return CompileChoice(mode, False, "--compile off")
    if mode == "on":
        where = "; a CPU run: allowed for testing, no speed gain" if device_type != "cuda" else ""
        return CompileChoice(mode, True, f"--compile on{where}")
    if device_type != "cuda":
        return CompileChoice(mode, False, "auto: a CPU run")
    forwards = sum(w.forwards for w in work)
    saved = sum(w.forwards * w.blocks * saved_seconds_per_block(w.tokens, w.dim) for w in work)
    sizes = len({w.tokens for w in work})
    cost = COMPILE_SECONDS * sizes
    per = f" ({sizes} video sizes)" if sizes > 1 else ""
    if saved > cost:
        reason = f"auto: {forwards:g} forwards save ~{saved:.0f} s, repaying ~{cost:.0f} s of compiling{per}"
        return CompileChoice(mode, True, reason)
    reason = f"auto: {forwards:g} forwards save ~{saved:.0f} s, less than ~{cost:.0f} s of compiling{per}"
    return CompileChoice(mode, False, reason)


def request_work(request: Request, plan: Plan | None, dit_config: Any) -> CompileWork:
    """A request's DiT work: the MagCache plan's forwards (else every step's CFG branches), its tokens."""
    from magcache_generate.cpu_estimate import forwards_of, tokens_of

    return CompileWork(
        forwards_of(request, plan), tokens_of(request, dit_config), dit_config.num_layers, dit_config.dim
    )


def summary_text(record: dict[str, Any]) -> str:
    """The summary row of the sidecar's `compile` record."""
    return f"{'on' if record['enabled'] else 'off'} ({record['reason']})"


def planned_choice(options: GenerateOptions, settings: PlanSettings) -> CompileChoice:
    """The decision `--magcache-plan` states (no weights, no GPU needed): that of a CUDA run of the
    official model at this size and frame count (`--device cpu`: a CPU run's)."""
    from magcache_generate.cpu_estimate import tokens_for
    from magcache_generate.distilled import apply_distilled
    from magcache_generate.gpu_plan import official_dit
    from magcache_generate.plan_check import build_plan
    from magcache_generate.validate import check_frame_num, resolve_size

    options = apply_distilled(options)
    cfg = settings.task
    size = resolve_size(options.size, cfg)
    frames = check_frame_num(cfg.frame_num if options.frame_num is None else options.frame_num)
    dit = official_dit(cfg)
    plan = build_plan(settings)
    forwards = plan.forwards if options.use_magcache else plan.dense_forwards
    work = CompileWork(forwards, tokens_for(cfg.name, size, frames, dit), dit.num_layers, dit.dim)
    device_type = "cpu" if options.device == "cpu" else "cuda"
    choice = decide_compile(check_compile(options.compile), device_type, [work])
    if options.device == "auto" and options.compile == "auto":
        return dataclasses.replace(choice, reason=f"{choice.reason}; on CUDA, off on the CPU")
    return choice
