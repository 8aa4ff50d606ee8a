"""The tensor side of MagCache: reuse a stored block-stack residual on the calls a Plan skips.

Contract with the runtime (the only two calls it makes):

    cache.begin_call(step, branch, expert)   # sampling loop, before each DiT call
    h_out = cache.run(h, blocks)             # transformer, around its block stack (blocks: h -> h_out)

On a computed call ``run`` returns ``blocks(h)`` and stores ``blocks(h) - h``; on a skipped call it
returns ``h + stored residual``. Everything outside the block stack (embeddings, head) always runs, as
upstream. One object serves one generation; nothing lives on the class.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from magcache_generate.magcache.plan import Plan, PlannedCall

Blocks = Callable[[Tensor], Tensor]


class ResidualCacheError(RuntimeError):
    """The runtime and the plan disagree (wrong order, shape, expert); the message says which."""


class NoCache:
    """Same interface, runs every call: the runtime's default when MagCache is off."""

    def begin_call(self, step: int, branch: str, expert: str) -> None:
        pass

    def run(self, h: Tensor, blocks: Blocks) -> Tensor:
        return blocks(h)


class ResidualCache:
    """Follows a precomputed Plan call by call and records what actually happened."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._residuals: dict[tuple[str, ...], Tensor] = {}
        self._call: PlannedCall | None = None
        self._done: dict[tuple[int, str], bool] = {}  # (step, branch) -> computed

    def _slot(self, call: PlannedCall) -> tuple[str, ...]:
        # Upstream quirk kept in official mode: one residual slot per branch, shared by both experts.
        if self.plan.mode == "official":
            return (call.branch,)
        return (call.expert, call.branch)

    def begin_call(self, step: int, branch: str, expert: str) -> None:
        if not self.plan.has_call(step, branch):
            raise ResidualCacheError(
                f"DiT call (step {step}, {branch}) is not in the {self.plan.steps}-step MagCache plan "
                f"with branches {self.plan.branches}; build the plan from this run's timesteps and guide scales"
            )
        if (step, branch) in self._done:
            raise ResidualCacheError(
                f"DiT call (step {step}, {branch}) ran twice; use a fresh ResidualCache per generation"
            )
        call = self.plan.call(step, branch)
        if call.expert != expert:
            raise ResidualCacheError(
                f"MagCache plan expects the {call.expert} expert at step {step} but the loop runs {expert}; "
                "build the plan with the loop's timesteps and boundary"
            )
        if self.plan.mode == "aligned" and expert == "low":
            # The high-noise slots are never read again after the switch: free them.
            self._residuals = {k: v for k, v in self._residuals.items() if k[0] != "high"}
        self._call = call

    def run(self, h: Tensor, blocks: Blocks) -> Tensor:
        call = self._call
        if call is None:
            raise ResidualCacheError("ResidualCache.run() called without begin_call(step, branch, expert)")
        self._call = None
        slot = self._slot(call)
        if call.computed:
            out = blocks(h)
            self._residuals[slot] = out - h
            self._done[(call.step, call.branch)] = True
            return out
        residual = self._residuals.get(slot)
        if residual is None:
            raise ResidualCacheError(
                f"MagCache plan skips step {call.step} ({call.branch}, {call.expert}) but no residual was "
                "computed for it yet; the plan must compute a branch's first call"
            )
        if residual.shape != h.shape:
            raise ResidualCacheError(
                f"cached residual for {'/'.join(slot)} has shape {tuple(residual.shape)} but the block input "
                f"at step {call.step} has {tuple(h.shape)}; one ResidualCache serves one generation"
            )
        self._done[(call.step, call.branch)] = False
        return h + residual

    def release(self) -> None:
        """Free the stored residuals (after the last call; the report keeps working)."""
        self._residuals = {}

    def report(self) -> dict[str, dict[str, dict[str, int]]]:
        """Calls that ran so far: report[expert][branch] = {"computed": n, "skipped": m}."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (step, branch), computed in self._done.items():
            expert = self.plan.call(step, branch).expert
            counts = out.setdefault(expert, {}).setdefault(branch, {"computed": 0, "skipped": 0})
            counts["computed" if computed else "skipped"] += 1
        return out
