"""The MagCache skip rule as a pure function of floats and ints (no torch, no tensors).

MagCache (Ma et al., arXiv 2506.09045) predicts how much the block-stack residual of a DiT call changes
from one step to the next with an offline "magnitude ratio" curve gamma. Per CFG branch it keeps

    R = product of gamma since the last computed call,
    n = number of consecutive candidate skips,
    E = accumulated skip error, sum of |1 - R|,

and skips a call while E stays below the threshold and at most K calls in a row were skipped.
`decide` is that rule for one call; windows that force computing (retention, expert starts) are the
caller's business and are passed in as ``forced``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Mode = Literal["official", "aligned"]
MODES: tuple[str, ...] = ("official", "aligned")


class MagCacheConfigError(ValueError):
    """A MagCache setting is out of range; the message says which one and how to fix it.

    `setting` names the field at fault (None for a rule across fields); the message refers to it as
    "MagCache <setting>", and `named` gives the same message under another name (the CLI's flag), so
    each range has one rule and one message."""

    def __init__(self, message: str, setting: str | None = None):
        self.template, self.setting = message, setting
        super().__init__(self.named(f"MagCache {setting}"))

    def named(self, name: str) -> str:
        return self.template.replace("{name}", name)


@dataclass(frozen=True)
class MagCacheConfig:
    """MagCache settings, named as upstream's flags (--magcache_thresh, --magcache_K, --retention_ratio).

    thresh: skip while the accumulated error stays strictly below it.
    K: maximum number of consecutive skips per branch; the (K+1)-th candidate computes.
    retention: fraction of calls at the start (of the run or of each expert phase, see plan.py)
        that always compute.
    mode: "official" reproduces MagCache4Wan2.2 call for call; "aligned" fixes its defects.
    """

    thresh: float = 0.06
    K: int = 2
    retention: float = 0.2
    mode: Mode = "aligned"

    def __post_init__(self) -> None:
        thresh, k, retention = self.thresh, self.K, self.retention
        if not _is_number(thresh) or not (math.isfinite(thresh) and thresh > 0):
            raise MagCacheConfigError(
                f"{{name}} {thresh!r} must be > 0; upstream's tuned value is 0.06 (larger skips more)",
                "thresh",
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise MagCacheConfigError(
                f"{{name}} {k!r} must be >= 1 (the most consecutive skips); upstream uses 2", "K"
            )
        if not _is_number(retention) or not (0 <= retention < 1):
            raise MagCacheConfigError(
                f"{{name}} {retention!r} must be in [0, 1): the fraction of steps that always compute first",
                "retention",
            )
        if self.mode not in MODES:
            raise MagCacheConfigError(
                f"unknown {{name}} {self.mode!r}; use aligned (default) or official", "mode"
            )
        if self.mode == "official" and self.retention == 0:
            # Upstream quirk: with retention 0 no window forces call 0, so it passes the rule (R=1, E=0)
            # and is skipped with no cached residual yet -> upstream crashes adding None to a tensor.
            raise MagCacheConfigError(
                "MagCache retention 0 is refused in official mode: upstream would skip the very first call "
                "before any residual exists and crash; use retention > 0 or mode 'aligned'"
            )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class BranchState:
    """Accumulators of one CFG branch since its last computed call."""

    ratio: float = 1.0  # R: product of gamma over the skipped run
    steps: int = 0  # n: consecutive candidate skips
    err: float = 0.0  # E: accumulated |1 - R|


FRESH = BranchState()


def decide(
    config: MagCacheConfig, state: BranchState, gamma: float, *, forced: bool = False
) -> tuple[bool, BranchState]:
    """One call of the MagCache rule: returns (skip, state after the call).

    A forced call (retention window, first call of an expert) computes and leaves the state exactly
    as it was: upstream neither accumulates nor resets inside its windows.
    """
    if forced:
        return False, state
    ratio = state.ratio * gamma
    steps = state.steps + 1
    err = state.err + abs(1.0 - ratio)
    # Strict '<' as upstream (diffusers uses '<='); the gamma that triggers a reset is not carried over.
    if err < config.thresh and steps <= config.K:
        return True, BranchState(ratio, steps, err)
    return False, FRESH
