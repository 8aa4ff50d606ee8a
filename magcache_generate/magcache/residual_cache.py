"""The tensor side of MagCache: reuse a stored block-stack residual on the calls a Plan skips.

Contract with the runtime:

    cache.begin_call(step, branch, expert)   # sampling loop, before each DiT call
    h_out = cache.run(h, blocks)             # transformer, around its block stack (blocks: h -> h_out)

On a computed call ``run`` returns ``blocks(h)`` and stores ``blocks(h) - h``; on a skipped call it
returns ``h + stored residual``. Everything outside the block stack (embeddings, head) always runs, as
upstream. One object serves one generation; nothing lives on the class.

A CFG step may run its branches as one forward with the branches stacked along the batch (cond
first). The loop then asks ``batchable(step, branches, expert)``: True only when the plan computes
every branch of that step or skips every one (else the loop makes one call per branch), and announces
the step with ``begin_batched_call(step, branches, expert)``. ``run`` then gets the stacked input and
treats each half as that branch's call: one block stack for all of them and each branch's residual
stored from its half, or each half plus its branch's stored residual. Counts and reports are per
branch, exactly as with separate calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from magcache_generate.magcache.plan import Plan, PlannedCall

Blocks = Callable[[Tensor], Tensor]


class ResidualCacheError(RuntimeError):
    """The runtime and the plan disagree (wrong order, shape, expert); the message says which."""


class NoCache:
    """Same interface, runs every call: the runtime's default when MagCache is off."""

    def begin_call(self, step: int, branch: str, expert: str) -> None:
        pass

    def batchable(self, step: int, branches: tuple[str, ...], expert: str) -> bool:
        return True

    def begin_batched_call(self, step: int, branches: tuple[str, ...], expert: str) -> None:
        pass

    def run(self, h: Tensor, blocks: Blocks) -> Tensor:
        return blocks(h)


class ResidualCache:
    """Follows a precomputed Plan call by call and records what actually happened."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._residuals: dict[tuple[str, ...], Tensor] = {}
        self._calls: tuple[PlannedCall, ...] = ()  # announced, not yet run (several: a batched step)
        self._done: dict[tuple[int, str], bool] = {}  # (step, branch) -> computed

    def _slot(self, call: PlannedCall) -> tuple[str, ...]:
        # Upstream quirk kept in official mode: one residual slot per branch, shared by both experts.
        if self.plan.mode == "official":
            return (call.branch,)
        return (call.expert, call.branch)

    def _planned(self, step: int, branch: str, expert: str) -> PlannedCall:
        """The plan's call for (step, branch), checked against what the loop runs."""
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
        return call

    def _begin(self, calls: tuple[PlannedCall, ...]) -> None:
        if self.plan.mode == "aligned" and calls[0].expert == "low":
            # The high-noise slots are never read again after the switch: free them.
            self._residuals = {k: v for k, v in self._residuals.items() if k[0] != "high"}
        self._calls = calls

    def begin_call(self, step: int, branch: str, expert: str) -> None:
        self._begin((self._planned(step, branch, expert),))

    def batchable(self, step: int, branches: tuple[str, ...], expert: str) -> bool:
        """Whether the plan makes one decision for all `branches` at `step` (all computed or all skipped)."""
        if not all(self.plan.has_call(step, b) for b in branches):
            return False  # the per-branch calls then say what is wrong
        return len({self.plan.call(step, b).computed for b in branches}) == 1

    def begin_batched_call(self, step: int, branches: tuple[str, ...], expert: str) -> None:
        calls = tuple(self._planned(step, b, expert) for b in branches)
        if len({c.computed for c in calls}) != 1:
            raise ResidualCacheError(
                f"MagCache plan computes some branches of step {step} and skips others; run them as "
                "separate calls (ask batchable() first)"
            )
        self._begin(calls)

    def run(self, h: Tensor, blocks: Blocks) -> Tensor:
        calls = self._calls
        if not calls:
            raise ResidualCacheError("ResidualCache.run() called without begin_call(step, branch, expert)")
        self._calls = ()
        if h.shape[0] % len(calls):
            raise ResidualCacheError(
                f"a batched DiT call of {len(calls)} branches got a block input of batch {h.shape[0]}"
            )
        rows = h.shape[0] // len(calls)  # each branch's part of the stacked batch (all of it: one call)
        parts = [slice(k * rows, (k + 1) * rows) for k in range(len(calls))]
        if calls[0].computed:
            out = blocks(h)
            for call, part in zip(calls, parts, strict=True):
                # one tensor per branch, not views of one: a later separate call replaces each on its own
                self._store(self._slot(call), out[part], h[part])
                self._done[(call.step, call.branch)] = True
            return out
        residuals = [self._stored(call, h[part]) for call, part in zip(calls, parts, strict=True)]
        for call in calls:
            self._done[(call.step, call.branch)] = False
        if len(calls) == 1:
            return h + residuals[0]
        out = h.new_empty(h.shape, dtype=torch.promote_types(h.dtype, residuals[0].dtype))
        for residual, part in zip(residuals, parts, strict=True):
            torch.add(h[part], residual, out=out[part])  # h + residual, branch by branch
        return out

    def _store(self, slot: tuple[str, ...], out: Tensor, h: Tensor) -> None:
        """Keep `out - h` as the slot's residual: written over the old one when it fits, else the old
        one is dropped before the new one is allocated (never two full-size residuals of a slot)."""
        old = self._residuals.pop(slot, None)
        if (
            old is not None
            and old.shape == out.shape
            and old.dtype == torch.promote_types(out.dtype, h.dtype)
            and old.device == out.device
        ):
            self._residuals[slot] = torch.sub(out, h, out=old)
            return
        del old
        self._residuals[slot] = out - h

    def _stored(self, call: PlannedCall, h: Tensor) -> Tensor:
        """The residual a skipped call adds, checked against its block input."""
        slot = self._slot(call)
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
        return residual

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
