"""Magnitude-ratio curves: the shipped official ones, user files, and resampling to other step counts.

Layout everywhere (upstream's): one flat list interleaving the two CFG branches per step,
``[cond(1), uncond(1), cond(2), uncond(2), ...]``, 2N-2 values for an N-step calibration run. Step 0 has
no predecessor; upstream prepends ``[1.0, 1.0]`` ("padded" curve, 2N values) and indexes it with the
call counter ``cnt = 2*step + branch``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

OFFICIAL_FILE = "mag_ratios_official.json"

# Task -> official curve key (ti2v-5B has one curve per conditioning: (task, has_image) -> key).
OFFICIAL_KEYS: dict[tuple[str, bool], str] = {
    ("t2v-A14B", False): "wan2.2/t2v-A14B",
    ("i2v-A14B", True): "wan2.2/i2v-A14B",
    ("ti2v-5B", False): "wan2.2/ti2v-5B/t2v",
    ("ti2v-5B", True): "wan2.2/ti2v-5B/i2v",
}
TASKS: tuple[str, ...] = ("t2v-A14B", "i2v-A14B", "ti2v-5B")

# A cross-expert jump is far below its neighbours (0.655 t2v, 0.911 i2v); the smooth parts of the
# official curves never dip by more than ~0.003 below both neighbours.
DIP_MIN_DROP = 0.03


class RatiosFileError(ValueError):
    """A ratios file is missing or malformed; the message names the file and the fix."""


@dataclass(frozen=True)
class MagCurve:
    """One calibrated curve with what is known about the run that produced it."""

    key: str  # official key ("wan2.2/t2v-A14B") or the file it came from
    ratios: tuple[float, ...]  # interleaved, without the [1, 1] padding: 2*steps - 2 values
    task: str | None = None
    has_image: bool | None = None
    shift: float | None = None
    boundary: float | None = None
    solver: str | None = None
    high_noise_steps: int | None = None  # the calibration run's expert switch (A14B)
    provenance: Mapping[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.ratios) % 2:
            raise ValueError(
                f"curve {self.key}: interleaved ratios need an even length, got {len(self.ratios)}"
            )

    @property
    def steps(self) -> int:
        """Step count of the calibration run."""
        return len(self.ratios) // 2 + 1

    @property
    def padded(self) -> list[float]:
        return [1.0, 1.0, *self.ratios]


# ---------------------------------------------------------------------------------------------------
# Resampling


def nearest_interp(values: Sequence[float], n: int) -> list[float]:
    """Upstream's nearest-neighbour resampling of one column to n entries.

    Index i maps to ``round(i * scale)`` with ``scale = (L-1)/(n-1)`` computed first, exactly as upstream
    (numpy rounds half to even, as Python's round does); endpoints are kept.
    """
    if n == 1:
        return [values[-1]]  # upstream quirk: a single entry takes the LAST value
    scale = (len(values) - 1) / (n - 1)
    return [values[round(i * scale)] for i in range(n)]


def _interleave(cond: Sequence[float], uncond: Sequence[float]) -> list[float]:
    return [g for pair in zip(cond, uncond, strict=True) for g in pair]


def interpolate_whole(padded: Sequence[float], steps: int) -> list[float]:
    """Upstream's rule: resample the cond (even) and uncond (odd) columns of the padded curve to
    ``steps`` entries each and re-interleave; a curve that already has 2*steps values is kept."""
    if len(padded) == 2 * steps:
        return list(padded)
    return _interleave(nearest_interp(padded[0::2], steps), nearest_interp(padded[1::2], steps))


def resample_magnitude(column: Sequence[float], n: int) -> list[float]:
    """Aligned mode: resample one branch's gamma column (entry 0 = the phase's first call) to n steps
    so that each new step's gamma is the magnitude change over the stretch of calibration steps it
    spans: the cumulative log-magnitude M(s) = sum_{u<=s} log(gamma_u) is interpolated linearly at
    positions j*(P-1)/(n-1) and gamma'_j = exp(M(x_j) - M(x_{j-1})). Fewer steps give larger changes
    per step (a 4-step run no longer looks like 4 tiny steps, as nearest resampling makes it), more
    steps give proportionally smaller ones; the first entry and the total change are kept."""
    if n == len(column):
        return list(column)
    if n <= 0:
        return []
    if n == 1:
        return [column[0]]  # keep the phase's first value (the switch), unlike upstream's last
    logs = [0.0]
    for gamma in column[1:]:
        logs.append(logs[-1] + math.log(gamma))
    last = len(logs) - 1
    scale = last / (n - 1)

    def magnitude(x: float) -> float:
        i = min(int(x), last)
        if i >= last:
            return logs[last]
        frac = x - i
        return logs[i] * (1 - frac) + logs[i + 1] * frac

    return [column[0]] + [math.exp(magnitude(j * scale) - magnitude((j - 1) * scale)) for j in range(1, n)]


def resample_magnitude_whole(padded: Sequence[float], steps: int) -> list[float]:
    """resample_magnitude on the cond and uncond columns of a padded curve, re-interleaved."""
    if len(padded) == 2 * steps:
        return list(padded)
    return _interleave(resample_magnitude(padded[0::2], steps), resample_magnitude(padded[1::2], steps))


def _resample_segment(column: Sequence[float], n: int) -> list[float]:
    return resample_magnitude(column, n)


def interpolate_per_expert(
    padded: Sequence[float], calibration_high_steps: int, high_steps: int, low_steps: int
) -> list[float]:
    """Resample the high-noise and low-noise segments of a padded two-expert curve separately.

    The curve is split at the calibration run's switch step; each segment (per column) goes to the
    run's own high/low step count, so the cross-expert dip stays on the run's first low-noise step.
    """
    calibration_steps = len(padded) // 2
    if not 0 < calibration_high_steps < calibration_steps:
        raise ValueError(
            f"calibration switch step {calibration_high_steps} must lie inside its {calibration_steps} steps"
        )
    cut = 2 * calibration_high_steps
    high, low = padded[:cut], padded[cut:]
    cond = _resample_segment(high[0::2], high_steps) + _resample_segment(low[0::2], low_steps)
    uncond = _resample_segment(high[1::2], high_steps) + _resample_segment(low[1::2], low_steps)
    return _interleave(cond, uncond)


def find_dip(padded: Sequence[float]) -> int | None:
    """Step whose cond ratio drops furthest below both neighbours (the cross-expert jump), if any."""
    cond = padded[0::2]
    best, best_drop = None, DIP_MIN_DROP
    for s in range(1, len(cond) - 1):
        drop = min(cond[s - 1], cond[s + 1]) - cond[s]
        if drop > best_drop:
            best, best_drop = s, drop
    return best


# ---------------------------------------------------------------------------------------------------
# The calibration runs' expert switch


def _wan_unipc_timesteps(steps: int, shift: float) -> list[int]:
    """Timesteps of Wan's UniPC loop (same formula as wan/schedule.py; kept local so the ratio tables do
    not depend on the runtime): sigma linspace(float32(0.999), 0, N+1)[:-1], shifted, x1000, truncated."""
    sigmas = np.linspace(0.9990000128746033, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * 1000).astype(np.int64).tolist()


def calibration_high_noise_steps(
    steps: int, shift: float, boundary: float, num_train_timesteps: int = 1000
) -> int:
    """Number of high-noise steps (t >= boundary*1000, inclusive as Wan) of a UniPC run."""
    return sum(t >= num_train_timesteps * boundary for t in _wan_unipc_timesteps(steps, shift))


# ---------------------------------------------------------------------------------------------------
# Loading


def _checked_ratios(values: object, where: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise RatiosFileError(
            f"{where}: expected a non-empty list of mag ratios, got {type(values).__name__}"
        )
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise RatiosFileError(
                f"{where}: mag ratio #{i} is {v!r}; every ratio must be a positive finite number"
            )
    if len(values) % 2:
        raise RatiosFileError(
            f"{where}: {len(values)} ratios is odd; the layout interleaves cond and uncond per step "
            "(2*steps - 2 values), so the list must have even length"
        )
    return tuple(float(v) for v in values)


def _task_of_key(key: str) -> tuple[str | None, bool | None]:
    for (task, has_image), official_key in OFFICIAL_KEYS.items():
        if official_key == key:
            return task, has_image
    return None, None


def _curve_from_official_entry(key: str, entry: Mapping, where: str) -> MagCurve:
    ratios = _checked_ratios(entry.get("ratios"), f"{where} [{key}].ratios")
    defaults = entry.get("wan_defaults", {})
    shift, boundary = defaults.get("sample_shift"), defaults.get("boundary")
    steps = entry.get("sample_steps", len(ratios) // 2 + 1)
    if 2 * steps - 2 != len(ratios):
        raise RatiosFileError(
            f"{where} [{key}]: sample_steps {steps} needs {2 * steps - 2} ratios, got {len(ratios)}"
        )
    high = None
    if shift is not None and boundary is not None:
        high = calibration_high_noise_steps(steps, shift, boundary)
    task, has_image = _task_of_key(key)
    provenance = {k: v for k, v in entry.items() if k != "ratios"}
    return MagCurve(key, ratios, task, has_image, shift, boundary, "unipc", high, provenance)


def _curve_from_calibration(data: Mapping, where: str) -> MagCurve:
    ratios = _checked_ratios(data.get("mag_ratios"), f"{where} mag_ratios")
    provenance = dict(data.get("provenance") or {})
    steps = data.get("steps", provenance.get("steps"))
    if steps is not None and 2 * steps - 2 != len(ratios):
        raise RatiosFileError(f"{where}: steps {steps} needs {2 * steps - 2} mag_ratios, got {len(ratios)}")
    return MagCurve(
        key=where,
        ratios=ratios,
        task=provenance.get("task"),
        has_image=provenance.get("has_image"),
        shift=provenance.get("shift"),
        boundary=provenance.get("boundary"),
        solver=provenance.get("solver"),
        high_noise_steps=data.get("high_noise_steps"),
        provenance=provenance,
    )


@cache
def official_curves() -> dict[str, MagCurve]:
    """All curves of the shipped ``mag_ratios_official.json`` (Wan 2.2 and Wan 2.1), keyed as in the file."""
    text = resources.files("magcache_generate").joinpath("data", OFFICIAL_FILE).read_text()
    data = json.loads(text)
    return {k: _curve_from_official_entry(k, v, OFFICIAL_FILE) for k, v in data.items() if k != "_meta"}


def official_curve(task: str, has_image: bool) -> MagCurve:
    """The upstream curve for a Wan 2.2 task (ti2v-5B: the text or the image curve)."""
    if task not in TASKS:
        raise ValueError(f"no official MagCache curve for task {task!r}; tasks: {', '.join(TASKS)}")
    if task != "ti2v-5B":
        has_image = task == "i2v-A14B"
    return official_curves()[OFFICIAL_KEYS[(task, has_image)]]


def load_ratios_file(path: str | Path, key: str | None = None) -> MagCurve:
    """Load a curve from JSON: a calibration file written by calibration.py, a bare interleaved list,
    a single official entry (``{"ratios": [...], ...}``) or the official multi-curve file (pass ``key``)."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise RatiosFileError(
            f"{where}: ratios file not found; pass a JSON file written by the calibrate command"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RatiosFileError(
            f"{where}: not valid JSON ({e}); expected a list of ratios or a calibration file"
        ) from e
    if isinstance(data, list):
        return MagCurve(where, _checked_ratios(data, where), provenance={"file": where})
    if not isinstance(data, dict):
        raise RatiosFileError(f"{where}: expected a JSON list or object, got {type(data).__name__}")
    if "mag_ratios" in data:
        return _curve_from_calibration(data, where)
    if "ratios" in data:
        return _curve_from_official_entry(key or where, data, where)
    curves = {k: v for k, v in data.items() if isinstance(v, dict) and "ratios" in v}
    if not curves:
        raise RatiosFileError(f"{where}: no 'mag_ratios' or 'ratios' list found; expected a calibration file")
    if key is None and len(curves) == 1:
        key = next(iter(curves))
    if key is None:
        raise RatiosFileError(f"{where}: holds several curves; choose one key of: {', '.join(curves)}")
    if key not in curves:
        raise RatiosFileError(f"{where}: has no curve {key!r}; keys: {', '.join(curves)}")
    return _curve_from_official_entry(key, curves[key], where)
