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
    """A MagCache setting is out of range; the message says which one and how to fix it."""


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
        if isinstance(self.thresh, bool) or not isinstance(self.thresh, (int, float)):
            raise MagCacheConfigError(f"MagCache thresh must be a number, got {self.thresh!r}")
        if not (math.isfinite(self.thresh) and self.thresh > 0):
            raise MagCacheConfigError(
                f"MagCache thresh must be a finite number > 0, got {self.thresh!r}; "
                "upstream's tuned value is 0.06 (larger skips more)"
            )
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K < 1:
            raise MagCacheConfigError(
                f"MagCache K (max consecutive skips) must be an integer >= 1, got {self.K!r}; upstream uses 2"
            )
        if isinstance(self.retention, bool) or not isinstance(self.retention, (int, float)):
            raise MagCacheConfigError(f"MagCache retention must be a number, got {self.retention!r}")
        if not (0 <= self.retention < 1):
            raise MagCacheConfigError(
                f"MagCache retention must be in [0, 1), got {self.retention!r}: it is the fraction of "
                "calls that always compute at the start of each phase (1 would never skip)"
            )
        if self.mode not in MODES:
            raise MagCacheConfigError(f"MagCache mode must be 'official' or 'aligned', got {self.mode!r}")
        if self.mode == "official" and self.retention == 0:
            # Upstream quirk: with retention 0 no window forces call 0, so it passes the rule (R=1, E=0)
            # and is skipped with no cached residual yet -> upstream crashes adding None to a tensor.
            raise MagCacheConfigError(
                "MagCache retention 0 is refused in official mode: upstream would skip the very first call "
                "before any residual exists and crash; use retention > 0 or mode 'aligned'"
            )


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
