"""Measure a magnitude-ratio curve on a dense run (upstream's --magcache_calibration, as an object).

`CalibrationRecorder` has the ResidualCache interface (``begin_call`` then ``run(h, blocks)``; a batched
CFG step is recorded branch by branch from its halves), never skips, and for every call after step 0
compares the block-stack residual r_t with the same branch's residual of the previous step, per token
(norms over the hidden dim):

    gamma  = mean over tokens of ||r_t|| / ||r_{t-1}||
    std    = std over tokens of that ratio
    cos    = mean over tokens of 1 - cos(r_t, r_{t-1})

As upstream, the previous residual of the first low-noise step is the high-noise expert's last one, so
the curve shows the expert switch as a dip. A CFG-free run (guide scale 1: cond-only steps) records no
uncond ratio there; the file then repeats the cond ratio in the uncond column and lists those steps
under ``uncond_from_cond`` (a plan for a CFG-free run reads only the cond column anyway). `to_json` writes upstream's interleaved layout (2N-2 values,
5 decimals) that ``ratios.load_ratios_file`` reads back, plus per-expert views and provenance.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

FORMAT = "magcache-calibration/1"
# per-token ratio [B, S] and cosine distance [B, S] -> [mean ratio, std ratio, mean cosine distance]
TokenStatistics = Callable[[Tensor, Tensor], Tensor]
REQUIRED_PROVENANCE = ("task", "shift", "size", "solver", "dtype", "prompts")


@dataclass(frozen=True)
class RatioSample:
    step: int
    branch: str
    expert: str
    gamma: float
    std: float
    cos_dis: float


@dataclass(frozen=True)
class CalibrationRecording:
    """Samples of one dense run (or an average of several), in call order."""

    samples: tuple[RatioSample, ...]
    experts: tuple[str, ...]  # expert of every step, step 0 included

    @property
    def steps(self) -> int:
        return len(self.experts)

    @property
    def high_noise_steps(self) -> int | None:
        return self.experts.count("high") if "high" in self.experts else None

    def _by_key(self) -> dict[tuple[int, str], RatioSample]:
        return {(s.step, s.branch): s for s in self.samples}

    def interleaved(self, stat: str) -> list[float]:
        """Upstream layout: [cond(1), uncond(1), cond(2), ...], 2N-2 values rounded to 5 decimals."""
        if self.steps < 2:
            raise ValueError(
                f"calibration recorded {self.steps} step(s); ratios need a dense run of at least 2"
            )
        by_key = self._by_key()
        missing = [(s, "cond") for s in range(1, self.steps) if (s, "cond") not in by_key]
        if missing:
            raise ValueError(
                f"calibration is incomplete: no sample for (step, branch) {missing[:4]}; it needs a full dense "
                "run with a cond call at every step"
            )
        return [
            round(getattr(by_key.get((s, b), by_key[(s, "cond")]), stat), 5)
            for s in range(1, self.steps)
            for b in ("cond", "uncond")
        ]

    @property
    def uncond_from_cond(self) -> list[int]:
        """Steps without an uncond ratio (CFG-free steps and the step after one): the cond one stands in."""
        have = {s.step for s in self.samples if s.branch == "uncond"}
        return [s for s in range(1, self.steps) if s not in have]

    def per_expert(self) -> dict[str, dict[str, list]]:
        out: dict[str, dict[str, list]] = {}
        for sample in self.samples:
            view = out.setdefault(sample.expert, {"steps": [], "cond": [], "uncond": []})
            if sample.branch == "cond":
                view["steps"].append(sample.step)
            view[sample.branch].append(round(sample.gamma, 5))
        return out

    def to_json(self, provenance: Mapping[str, object]) -> dict:
        missing = [k for k in REQUIRED_PROVENANCE if k not in provenance]
        if missing:
            raise ValueError(
                f"calibration provenance lacks {', '.join(missing)}; record how the run was made"
            )
        if provenance.get("steps", self.steps) != self.steps:
            raise ValueError(f"provenance says {provenance['steps']} steps but {self.steps} were recorded")
        return {
            "format": FORMAT,
            "provenance": {**provenance, "steps": self.steps},
            "steps": self.steps,
            "high_noise_steps": self.high_noise_steps,
            "mag_ratios": self.interleaved("gamma"),
            "mag_std": self.interleaved("std"),
            "cos_dis": self.interleaved("cos_dis"),
            "per_expert": self.per_expert(),
            "uncond_from_cond": self.uncond_from_cond,
        }


class CalibrationRecorder:
    """Runs every call and records the residual statistics; one object per dense run.

    The statistics stay on the run device as one small tensor per call and are read back to the host
    once, by ``recording()`` after the run, so a CUDA forward never waits for the host.
    """

    def __init__(self, token_statistics: TokenStatistics | None = None) -> None:
        # under sequence parallelism each process holds a shard of the tokens: the statistics are then
        # reduced over the whole sequence (`wan.distributed.sequence.SequenceParallel.token_statistics`)
        self._token_statistics = token_statistics
        self._previous: dict[str, Tensor] = {}  # branch -> residual of its previous call (any expert)
        self._pending: list[tuple[int, str, str, Tensor]] = []  # (step, branch, expert, [gamma, std, cos])
        self._experts: dict[int, str] = {}
        self._calls: tuple[tuple[int, str, str], ...] = ()  # announced, not yet run

    def begin_call(self, step: int, branch: str, expert: str) -> None:
        self._calls = ((step, branch, expert),)
        self._experts[step] = expert

    def batchable(self, step: int, branches: tuple[str, ...], expert: str) -> bool:
        """Always: a dense run computes every call, and a batched one is recorded branch by branch."""
        return True

    def begin_batched_call(self, step: int, branches: tuple[str, ...], expert: str) -> None:
        """The branches of one step stacked along the batch (in this order): each half is recorded
        as that branch's call, in the same order as separate calls."""
        self._calls = tuple((step, branch, expert) for branch in branches)
        self._experts[step] = expert

    def run(self, h: Tensor, blocks: Callable[[Tensor], Tensor]) -> Tensor:
        calls = self._calls
        if not calls:
            raise RuntimeError("CalibrationRecorder.run() called without begin_call(step, branch, expert)")
        self._calls = ()
        if h.shape[0] % len(calls):
            raise RuntimeError(
                f"a batched call of {len(calls)} branches got a block input of batch {h.shape[0]}"
            )
        out = blocks(h)
        rows = h.shape[0] // len(calls)
        for k, call in enumerate(calls):
            part = slice(k * rows, (k + 1) * rows)
            self._record(*call, h[part], out[part])
        return out

    def _record(self, step: int, branch: str, expert: str, h: Tensor, out: Tensor) -> None:
        # float32 statistics whatever the run's dtype (upstream's residuals are fp32 as well)
        residual = (out - h).float()
        previous = self._previous.get(branch)
        if previous is not None:
            if previous.shape != residual.shape:
                raise RuntimeError(
                    f"residual shape changed from {tuple(previous.shape)} to {tuple(residual.shape)} at step "
                    f"{step} ({branch}); calibrate one generation per recorder"
                )
            token_ratio = residual.norm(dim=-1) / previous.norm(dim=-1)
            cos_dis = 1 - F.cosine_similarity(residual, previous, dim=-1, eps=1e-8)
            if self._token_statistics is not None:
                stats = self._token_statistics(token_ratio, cos_dis)
            else:
                stats = torch.stack([token_ratio.mean(), token_ratio.std(), cos_dis.mean()])
            self._pending.append((step, branch, expert, stats))
        self._previous[branch] = residual

    def release(self) -> None:
        """Free the residuals kept for the next call's ratio (after the last call)."""
        self._previous = {}

    def recording(self) -> CalibrationRecording:
        """The samples so far; the only place the statistics leave the device (one transfer)."""
        experts = tuple(self._experts[s] for s in sorted(self._experts))
        if sorted(self._experts) != list(range(len(experts))):
            raise ValueError(f"calibration saw steps {sorted(self._experts)}; it needs every step from 0")
        values = torch.stack([stats for *_, stats in self._pending]).tolist() if self._pending else []
        samples = tuple(
            RatioSample(step, branch, expert, *row)
            for (step, branch, expert, _), row in zip(self._pending, values, strict=True)
        )
        return CalibrationRecording(samples, experts)

    def to_json(self, provenance: Mapping[str, object]) -> dict:
        return self.recording().to_json(provenance)


def average(recordings: Sequence[CalibrationRecording]) -> CalibrationRecording:
    """Mean of each statistic over several runs (e.g. prompts) with the same steps and experts."""
    if not recordings:
        raise ValueError("average() needs at least one calibration recording")
    first = recordings[0]
    layout = [(s.step, s.branch, s.expert) for s in first.samples]
    for other in recordings[1:]:
        if other.experts != first.experts or [(s.step, s.branch, s.expert) for s in other.samples] != layout:
            raise ValueError(
                "calibration recordings differ in steps, branches or experts; average like runs only"
            )
    samples = tuple(
        RatioSample(
            *key,
            statistics.fmean(r.samples[i].gamma for r in recordings),
            statistics.fmean(r.samples[i].std for r in recordings),  # mean of per-run stds
            statistics.fmean(r.samples[i].cos_dis for r in recordings),
        )
        for i, key in enumerate(layout)
    )
    return CalibrationRecording(samples, first.experts)


def save_calibration(path: str | Path, data: Mapping) -> None:
    """Write ``to_json``'s dict as indented JSON."""
    Path(path).write_text(json.dumps(data, indent=1) + "\n")
