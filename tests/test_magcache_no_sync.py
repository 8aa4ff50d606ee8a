"""MagCache's tensor side never waits for the device: TimedCache, CalibrationRecorder, ResidualCache.

On the CPU the hot path is checked by making every tensor-to-host conversion raise while the calls
run; the statistics are then read once and must equal the per-call values of the previous recorder
(which called ``.item()`` per call). On CUDA (``cuda`` marker) the same calls run under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from magcache_generate.magcache.calibration import CalibrationRecorder
from magcache_generate.magcache.plan import Plan, PlannedCall
from magcache_generate.magcache.policy import MagCacheConfig
from magcache_generate.magcache.residual_cache import ResidualCache
from magcache_generate.magcache.session import TimedCache

EXPERTS = ["high", "high", "high", "low", "low"]


def blocks_for(seed: int, device: str = "cpu"):
    """A deterministic nonlinear block stack whose residual changes from call to call. Its weight is
    put on `device` here, once: a host-to-device copy inside the calls would itself synchronise."""
    weight = (torch.randn(16, 16, generator=torch.Generator().manual_seed(seed)) / 4).to(device)

    def blocks(h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(h @ weight)

    return blocks


def inputs(device: str = "cpu") -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 7, 16, generator=generator).to(device) for _ in range(2 * len(EXPERTS))]


def drive(cache, xs: list[torch.Tensor], stacks: list | None = None) -> list[torch.Tensor]:
    stacks = stacks or [blocks_for(j) for j in range(2)]
    out = []
    for step, expert in enumerate(EXPERTS):
        for j, branch in enumerate(("cond", "uncond")):
            cache.begin_call(step, branch, expert)
            out.append(cache.run(xs[2 * step + j], stacks[j]))
    return out


def per_call_reference(xs: list[torch.Tensor]) -> list[tuple[int, str, str, float, float, float]]:
    """The statistics as the previous recorder computed them: one ``.item()`` per value and call."""
    previous, samples = {}, []
    for step, expert in enumerate(EXPERTS):
        for j, branch in enumerate(("cond", "uncond")):
            h = xs[2 * step + j]
            residual = (blocks_for(j)(h) - h).float()
            if branch in previous:
                ratio = residual.norm(dim=-1) / previous[branch].norm(dim=-1)
                cos = 1 - F.cosine_similarity(residual, previous[branch], dim=-1, eps=1e-8)
                samples.append(
                    (step, branch, expert, ratio.mean().item(), ratio.std().item(), cos.mean().item())
                )
            previous[branch] = residual
    return samples


@contextlib.contextmanager
def host_reads_forbidden(monkeypatch):
    """Every way a tensor value reaches Python (or the host waits for it) raises inside the block."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host inside the hot path")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            patch.setattr(torch.Tensor, name, forbidden)
        patch.setattr(torch.cuda, "synchronize", forbidden)
        yield


def test_calibration_reads_the_device_once_and_equals_the_per_call_values(monkeypatch):
    xs = inputs()
    recorder = CalibrationRecorder()
    with host_reads_forbidden(monkeypatch):
        drive(TimedCache(recorder), xs)
    samples = recorder.recording().samples
    got = [(s.step, s.branch, s.expert, s.gamma, s.std, s.cos_dis) for s in samples]
    assert got == per_call_reference(xs)  # exactly: the same float32 values, read in one transfer
    assert len(got) == 2 * (len(EXPERTS) - 1)


def toy_plan() -> Plan:
    pattern = {"cond": "CsCCs", "uncond": "CsCCs"}
    calls = tuple(
        PlannedCall(s, b, EXPERTS[s], pattern[b][s] == "C", False, 1.0)
        for s in range(len(EXPERTS))
        for b in pattern
    )
    return Plan("t2v-A14B", "aligned", len(EXPERTS), MagCacheConfig(), "toy", calls)


def test_residual_cache_and_timer_do_not_touch_the_host(monkeypatch):
    xs = inputs()
    cache = TimedCache(ResidualCache(toy_plan()))
    with host_reads_forbidden(monkeypatch):
        outs = drive(cache, xs)
    # skipped calls (step 1 and 4) reuse the residual of the branch's last computed call
    cond_residual_step0 = blocks_for(0)(xs[0]) - xs[0]
    assert torch.equal(outs[2], xs[2] + cond_residual_step0)
    seconds = cache.block_seconds()
    assert len(seconds) == 6 and all(s >= 0 for s in seconds)  # computed calls only
    assert cache.inner.report()["high"]["cond"] == {"computed": 2, "skipped": 1}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_synchronisation_on_cuda():
    xs = inputs("cuda")
    recorder = CalibrationRecorder()
    timed_recorder, timed_cache = TimedCache(recorder), TimedCache(ResidualCache(toy_plan()))
    stacks = [blocks_for(j, "cuda") for j in range(2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        drive(timed_recorder, xs, stacks)
        drive(timed_cache, xs, stacks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    seconds = timed_cache.block_seconds()  # read once, after the stage
    assert len(seconds) == 6 and all(s > 0 for s in seconds)
    cpu = per_call_reference([x.cpu() for x in xs])
    got = [(s.step, s.branch, s.expert, s.gamma, s.std, s.cos_dis) for s in recorder.recording().samples]
    assert [g[:3] for g in got] == [c[:3] for c in cpu]
    assert torch.allclose(torch.tensor([g[3:] for g in got]), torch.tensor([c[3:] for c in cpu]), atol=1e-5)
