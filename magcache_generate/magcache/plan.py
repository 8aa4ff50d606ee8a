"""The full MagCache schedule of one generation, decided before the first DiT call.

Decisions depend only on the curve, the step count and the settings (not on the prompt or the latents),
so the sampling loop's every call can be planned, printed and checked without a model.

Two modes:

official -- MagCache4Wan2.2 (Zehong-Ma/MagCache @ df81cb1) call for call:
  * one global call counter ``cnt = 2*step + branch`` across both experts; per-branch state shared
    by the experts (it carries over the switch); the padded curve, nearest-resampled as a whole when
    its length is not 2N;
  * forced windows in call units, with ``split = 2 * high-noise steps`` counted on upstream's OWN
    sigma grid (linspace(1, 0.01)), not the loop's: t2v ``cnt < int(split*r)`` or
    ``split <= cnt <= (2N-split)*r + split``; i2v ``cnt < int(split + (2N-split)*r)``; ti2v
    ``cnt < int(2N*r)``;
  * only fix: ti2v-5B takes the single-model branch (upstream raises TypeError on ``None*2``).

aligned (default) -- the same rule with upstream's defects fixed:
  * the expert switch comes from the loop's real timesteps;
  * a curve calibrated for another step count is resampled per expert segment, so its cross-expert
    dip stays on the run's switch (upstream's whole-curve resampling moves or loses it);
  * the accumulators start fresh in each expert phase and the first call of each expert and branch
    computes (upstream carries the state and the residual over the switch);
  * retention is counted per phase in steps, not calls, so cond and uncond stay in phase
    (upstream's call units let them drift apart, e.g. i2v step 17): the first round(r*P) steps of a
    P-step phase compute (half up); i2v-A14B keeps upstream's dense high-noise phase.

CFG-free steps (guide scale 1, as the 4-step distilled recipe) run only the conditional forward, so the
plan can have one branch per expert (``branches={"high": ("cond",), "low": ("cond", "uncond")}``);
the aligned mode plans those steps with the cond column of the curve. Official mode needs both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from magcache_generate.magcache.policy import FRESH, BranchState, MagCacheConfig, MagCacheConfigError, decide
from magcache_generate.magcache.ratios import (
    TASKS,
    MagCurve,
    find_dip,
    interpolate_per_expert,
    interpolate_whole,
    resample_magnitude_whole,
)

BRANCHES: tuple[str, ...] = ("cond", "uncond")
BRANCH_INDEX = {"cond": 0, "uncond": 1}  # column in the interleaved curve
# The forwards of a step: one set for every expert, or one per expert ("high", "low", "single").
Branches = Sequence[str] | Mapping[str, Sequence[str]]

# Upstream README settings (E006K2R04 / E006K2R01 / E006K2R02) as (thresh, K, retention).
PRESETS: dict[str, tuple[float, int, float]] = {
    "t2v-A14B": (0.06, 2, 0.4),
    "i2v-A14B": (0.06, 2, 0.1),
    "ti2v-5B": (0.06, 2, 0.2),
}


def preset_config(task: str, mode: str = "aligned") -> MagCacheConfig:
    thresh, k, retention = PRESETS[task]
    return MagCacheConfig(thresh=thresh, K=k, retention=retention, mode=mode)


@dataclass(frozen=True)
class PlannedCall:
    step: int
    branch: str  # "cond" | "uncond"
    expert: str  # "high" | "low" | "single"
    computed: bool
    forced: bool  # computed because of a retention window or an expert start, not by the rule
    gamma: float  # curve value this call reads (unused when forced)


@dataclass(frozen=True)
class Plan:
    task: str
    mode: str
    steps: int
    config: MagCacheConfig
    curve_key: str
    calls: tuple[PlannedCall, ...]
    warnings: tuple[str, ...] = ()
    no_skip_reason: str | None = None

    def count(self, expert: str | None = None, branch: str | None = None) -> tuple[int, int]:
        """(forwards, dense forwards) over the calls matching expert and branch."""
        sel = [c for c in self.calls if expert in (None, c.expert) and branch in (None, c.branch)]
        return sum(c.computed for c in sel), len(sel)

    @property
    def forwards(self) -> int:
        return self.count()[0]

    @property
    def dense_forwards(self) -> int:
        return len(self.calls)

    @property
    def ideal_speedup(self) -> float:
        """Dense over cached block-stack runs (embeddings, head, VAE and text encoder not counted)."""
        return self.dense_forwards / self.forwards if self.forwards else math.inf

    @property
    def experts(self) -> list[str]:
        """Expert of each step."""
        return [c.expert for c in self.calls if c.branch == "cond"]

    @property
    def branches(self) -> tuple[str, ...]:
        """Every branch some step runs, in call order."""
        return tuple(b for b in BRANCHES if any(c.branch == b for c in self.calls))

    def branches_at(self, step: int) -> tuple[str, ...]:
        return tuple(b for b in BRANCHES if (step, b) in self._index)

    @property
    def cfg_free_experts(self) -> list[str]:
        """Experts whose steps run only the conditional forward (guide scale 1)."""
        experts = list(dict.fromkeys(self.experts))
        return [e for e in experts if not any(c.expert == e and c.branch == "uncond" for c in self.calls)]

    def skipped_steps(self, branch: str) -> list[int]:
        return [c.step for c in self.calls if c.branch == branch and not c.computed]

    def has_call(self, step: int, branch: str) -> bool:
        return (step, branch) in self._index

    def call(self, step: int, branch: str) -> PlannedCall:
        return self.calls[self._index[(step, branch)]]

    @cached_property
    def _index(self) -> dict[tuple[int, str], int]:
        return {(c.step, c.branch): i for i, c in enumerate(self.calls)}


# ---------------------------------------------------------------------------------------------------
# Experts and upstream's split


def expert_for(t: int, boundary: float | None, num_train_timesteps: int = 1000) -> str:
    if boundary is None:
        return "single"
    return "high" if t >= num_train_timesteps * boundary else "low"  # inclusive, as Wan


def script_high_noise_steps(steps: int, shift: float, boundary: float) -> int:
    """High-noise step count on upstream MagCache's own grid (its ``get_timesteps``): sigma
    linspace(1.0, 0.01, N+1)[:-1], shifted in float64, cast to float32, x1000 in float32, truncated."""
    sigmas = np.linspace(1.0, 0.01, steps + 1)[:-1]
    sigmas = (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)
    timesteps = (sigmas * np.float32(1000)).astype(np.int64)
    return int((timesteps >= 1000 * boundary).sum())


# ---------------------------------------------------------------------------------------------------
# Planning: layout (where each call sits, its gamma, whether it is forced), then the rule


@dataclass(frozen=True)
class _Slot:
    step: int
    branch: str
    expert: str
    gamma: float
    forced: bool
    fresh_state: bool  # aligned: first call of this branch in an expert phase starts from fresh state


def _official_forced(task: str, cnt: int, n_calls: int, split: int | None, r: float) -> bool:
    if split is None:  # ti2v-5B: upstream's split_step-is-None branch (its None*2 crash fixed)
        return cnt < int(n_calls * r)
    if task == "i2v-A14B":
        return cnt < int(split + (n_calls - split) * r)
    # Upstream quirk: second window's bound is a float and inclusive.
    return cnt < int(split * r) or split <= cnt <= (n_calls - split) * r + split


def _phases(experts: Sequence[str]) -> list[tuple[str, int, int]]:
    """Contiguous runs of one expert as (expert, first step, step count)."""
    runs: list[tuple[str, int, int]] = []
    for s, e in enumerate(experts):
        if runs and runs[-1][0] == e:
            runs[-1] = (e, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((e, s, 1))
    return runs


def _curve_warnings(
    task: str, curve: MagCurve, steps: int, shift: float | None, has_image: bool | None, mode: str
) -> list[str]:
    out = []
    if curve.task is not None and curve.task != task:
        out.append(f"curve {curve.key} was calibrated for {curve.task}, this run is {task}")
    elif has_image is not None and curve.has_image is not None and has_image != curve.has_image:
        want = "with" if curve.has_image else "without"
        out.append(f"curve {curve.key} was calibrated {want} an input image; this run differs")
    if shift is not None and curve.shift is not None and shift != curve.shift:
        out.append(f"curve {curve.key} was calibrated at shift {curve.shift}, this run uses {shift}")
    if curve.steps != steps and mode == "official":  # aligned mode interpolates each expert's part: expected
        out.append(
            f"curve {curve.key} was calibrated for {curve.steps} steps, this run has {steps}: resampling it"
        )
    if 2 * steps < curve.steps and mode == "official":
        # Upstream's nearest resampling: a ratio still measures one calibration step, not the much longer gap between two
        # steps of this run, so the rule sees too little change and skips optimistically.
        out.append(
            f"{steps} steps is far fewer than the curve's {curve.steps}: its ratios underestimate the change per "
            "step and skips are optimistic (few-step / distilled models: turn MagCache off or calibrate)"
        )
    return out


def _aligned_gammas(curve: MagCurve, experts: list[str], warnings: list[str]) -> list[float]:
    steps, high = len(experts), experts.count("high")
    padded = curve.padded
    two_phase = experts == ["high"] * high + ["low"] * (steps - high) and 0 < high < steps
    switch = curve.high_noise_steps if curve.high_noise_steps is not None else find_dip(padded)
    if two_phase and switch is not None and 0 < switch < curve.steps:
        return interpolate_per_expert(padded, switch, high, steps - high)
    if two_phase and len(padded) != 2 * steps:
        warnings.append(f"curve {curve.key} has no known expert switch: resampling it as a whole")
    return resample_magnitude_whole(padded, steps)


def _layout(
    task: str,
    timesteps: Sequence[int],
    boundary: float | None,
    config: MagCacheConfig,
    curve: MagCurve,
    shift: float | None,
    branches: Branches,
    warnings: list[str],
) -> list[_Slot]:
    steps = len(timesteps)
    experts = [expert_for(t, boundary) for t in timesteps]
    high = experts.count("high")
    r = config.retention
    slots = []
    per_expert = _branches_per_expert(branches, experts)
    if config.mode == "official":
        if any(tuple(b) != BRANCHES for b in per_expert.values()):
            raise MagCacheConfigError(
                "MagCache official mode reproduces upstream's script, which always runs cond and uncond; a guide "
                "scale of 1 runs the conditional forward only: use --magcache-mode aligned"
            )
        gammas = interpolate_whole(curve.padded, steps)
        split = None
        if boundary is not None:
            if shift is None:
                raise ValueError("official mode needs the run's shift to reproduce upstream's expert split")
            script_high = script_high_noise_steps(steps, shift, boundary)
            split = 2 * script_high
            if script_high != high:
                warnings.append(
                    f"upstream counts {script_high} high-noise steps on its own sigma grid, the loop runs "
                    f"{high}: its retention windows are placed as upstream's (official mode)"
                )
        for s in range(steps):
            for b in BRANCHES:
                cnt = 2 * s + BRANCH_INDEX[b]
                forced = _official_forced(task, cnt, 2 * steps, split, r)
                slots.append(_Slot(s, b, experts[s], gammas[cnt], forced, False))
    else:
        gammas = _aligned_gammas(curve, experts, warnings)
        for expert, start, length in _phases(experts):
            dense = task == "i2v-A14B" and expert == "high"  # as upstream: MagCache acts on low noise only
            kept = length if dense else max(1, math.floor(r * length + 0.5))
            for s in range(start, start + length):
                for b in per_expert[expert]:
                    gamma = gammas[2 * s + BRANCH_INDEX[b]]
                    slots.append(_Slot(s, b, expert, gamma, s - start < kept, s == start))
    # Only official mode places its windows by the curve's whole-run shape; aligned mode starts each expert's
    # phase fresh at the loop's own switch, so a moved dip changes nothing there.
    official = config.mode == "official"
    if official and boundary is not None and 0 < high < steps and find_dip(curve.padded) is not None:
        dip = find_dip(gammas)
        if dip != high:
            where = f"at step {dip}" if dip is not None else "nowhere (lost in resampling)"
            warnings.append(
                f"the curve's cross-expert dip lands {where}; the loop switches experts at step {high}"
            )
    return slots


def _branches_per_expert(branches: Branches, experts: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Normalise ``branches`` to expert -> branches; each set is 'cond', 'uncond' or both, in that order."""
    if isinstance(branches, Mapping):
        missing = sorted(set(experts) - set(branches))
        if missing:
            raise ValueError(f"branches given for experts {sorted(branches)}, not for {missing}")
        out = {e: tuple(branches[e]) for e in dict.fromkeys(experts)}
    else:
        out = dict.fromkeys(experts, tuple(branches))
    for b in out.values():
        if not b or [x for x in BRANCHES if x in b] != list(b):
            raise ValueError(f"branches must be 'cond', 'uncond' or both, in that order; got {b}")
    return out


def _decide_all(slots: Sequence[_Slot], config: MagCacheConfig) -> list[PlannedCall]:
    state: dict[str, BranchState] = {}
    calls = []
    for slot in slots:
        if slot.fresh_state:
            state[slot.branch] = FRESH
        skip, state[slot.branch] = decide(
            config, state.get(slot.branch, FRESH), slot.gamma, forced=slot.forced
        )
        calls.append(PlannedCall(slot.step, slot.branch, slot.expert, not skip, slot.forced, slot.gamma))
    return calls


def _refuse_skip_before_first_compute(calls: Sequence[PlannedCall], config: MagCacheConfig) -> None:
    for branch in BRANCHES:
        first = next(c for c in calls if c.branch == branch)
        if not first.computed:
            # Upstream adds its still-empty residual slot (None) to the tokens here and crashes.
            raise MagCacheConfigError(
                f"official mode would skip the first {branch} call (step {first.step}) before any residual "
                f"exists, where upstream crashes; raise retention above {config.retention} or use mode 'aligned'"
            )


def _no_skip_reason(calls: Sequence[PlannedCall], config: MagCacheConfig) -> str | None:
    if any(not c.computed for c in calls):
        return None
    steps = calls[-1].step + 1
    eligible = sum(not c.forced for c in calls)
    route = (
        "; for a 6-8 step (distilled) schedule, calibrate a curve at that step count (--magcache-calibrate "
        "FILE) and check what it skips with --magcache-plan --magcache-ratios FILE"
    )
    if eligible == 0:
        why = "retention windows" if config.mode == "official" else "retention windows and expert starts"
        return (
            f"MagCache skips nothing: all {len(calls)} DiT calls of this {steps}-step run are forced to compute "
            f"by its {why} (retention {config.retention}); use more steps or a lower retention"
            + (route if steps <= 8 else "")
        )
    return (
        f"MagCache skips nothing at {steps} steps: each of the {eligible} eligible calls has |1 - ratio| >= "
        f"thresh {config.thresh}, the residual changes too much from step to step (few-step / distilled "
        "schedules do not benefit), so every call computes" + (route if steps <= 8 else "")
    )


def plan(
    task: str,
    timesteps: Sequence[int],
    boundary: float | None,
    config: MagCacheConfig,
    curve: MagCurve,
    *,
    shift: float | None = None,
    has_image: bool | None = None,
    branches: Branches = BRANCHES,
) -> Plan:
    """Decide every DiT call of a run with these model timesteps (loop order).

    boundary: the A14B expert boundary (t >= boundary*1000 runs the high-noise expert); None = one model.
    shift: the run's sigma shift; official mode needs it for upstream's split, both modes use it to
    warn about a curve calibrated at another shift. has_image: only used to warn about a ti2v curve.
    branches: the forwards of each step, for all experts or per expert (CFG-free experts: ("cond",)).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if not timesteps:
        raise ValueError("a MagCache plan needs the run's timesteps; got none")
    if (boundary is None) != (task == "ti2v-5B"):
        raise ValueError(f"task {task} {'has no' if task == 'ti2v-5B' else 'needs an'} expert boundary")
    warnings = _curve_warnings(task, curve, len(timesteps), shift, has_image, config.mode)
    slots = _layout(task, timesteps, boundary, config, curve, shift, branches, warnings)
    calls = _decide_all(slots, config)
    if config.mode == "official":
        _refuse_skip_before_first_compute(calls, config)
    return Plan(
        task=task,
        mode=config.mode,
        steps=len(timesteps),
        config=config,
        curve_key=curve.key,
        calls=tuple(calls),
        warnings=tuple(warnings),
        no_skip_reason=_no_skip_reason(calls, config),
    )


# ---------------------------------------------------------------------------------------------------
# Threshold search


class UnreachableSpeedupError(ValueError):
    """No threshold reaches the requested ideal speedup with these K and retention settings."""


THRESH_GRID_STEP = 0.001


def threshold_for_speedup(
    target: float,
    task: str,
    timesteps: Sequence[int],
    boundary: float | None,
    config: MagCacheConfig,
    curve: MagCurve,
    *,
    shift: float | None = None,
    max_thresh: float = 1.0,
    branches: Branches = BRANCHES,
) -> float:
    """Smallest threshold whose plan reaches ``ideal_speedup >= target`` (K, retention, mode from config).

    The speedup is a step function of the threshold that is not guaranteed monotone (an earlier skip
    moves later resets), so this scans a 0.001 grid up to max_thresh for the first passing value, then
    bisects between it and the last failing grid point down to 1e-6.
    """
    if not target > 1:
        raise ValueError(f"target speedup must be > 1 (1 means no caching), got {target}")
    slots = _layout(task, timesteps, boundary, config, curve, shift, branches, [])

    def speedup(thresh: float) -> float:
        calls = _decide_all(slots, dataclasses.replace(config, thresh=thresh))
        return len(calls) / sum(c.computed for c in calls)

    lo, best = 0.0, 1.0
    for i in range(1, round(max_thresh / THRESH_GRID_STEP) + 1):
        hi = i * THRESH_GRID_STEP
        got = speedup(hi)
        if got >= target:
            break
        lo, best = hi, max(best, got)
    else:
        raise UnreachableSpeedupError(
            f"ideal speedup {target}x is out of reach for {task} at {len(timesteps)} steps: the best with "
            f"K={config.K}, retention={config.retention} and thresh <= {max_thresh} is {best:.3f}x; "
            "raise K, lower retention or ask for less"
        )
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if speedup(mid) >= target else (mid, hi)
    rounded = math.ceil(hi * 1e6) / 1e6
    return rounded if speedup(rounded) >= target else hi
