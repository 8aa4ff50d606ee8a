"""ResidualCache and CalibrationRecorder on hand-computable toys (a block stack that doubles its input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magcache_generate.magcache.calibration import CalibrationRecorder, average, save_calibration
from magcache_generate.magcache.plan import Plan, PlannedCall, plan, preset_config
from magcache_generate.magcache.policy import MagCacheConfig
from magcache_generate.magcache.ratios import load_ratios_file, official_curve
from magcache_generate.magcache.residual_cache import NoCache, ResidualCache, ResidualCacheError


def double(h: torch.Tensor) -> torch.Tensor:
    """Toy block stack: output 2h, so the residual is h itself."""
    return 2 * h


def toy_plan(pattern: dict[str, str], experts: str, mode: str = "aligned") -> Plan:
    """pattern: branch -> 'C'/'s' per step; experts: 'H'/'L'/'S' per step."""
    names = {"H": "high", "L": "low", "S": "single"}
    calls = tuple(
        PlannedCall(s, b, names[experts[s]], pattern[b][s] == "C", False, 1.0)
        for s in range(len(experts))
        for b in pattern
    )
    return Plan("t2v-A14B", mode, len(experts), MagCacheConfig(mode=mode), "toy", calls)


def full(value: float) -> torch.Tensor:
    return torch.full((1, 3, 2), value)


def run(cache, step: int, branch: str, expert: str, value: float) -> torch.Tensor:
    cache.begin_call(step, branch, expert)
    return cache.run(full(value), double)


# ------------------------------------------------------------------------------------ ResidualCache


def test_skip_returns_input_plus_stored_residual():
    cache = ResidualCache(toy_plan({"cond": "CsC"}, "SSS"))
    assert torch.equal(run(cache, 0, "cond", "single", 1.0), full(2.0))  # compute: 2*1, residual 1
    assert torch.equal(run(cache, 1, "cond", "single", 5.0), full(6.0))  # skip: 5 + 1 (compute: 10)
    assert torch.equal(run(cache, 2, "cond", "single", 3.0), full(6.0))  # compute again: residual 3
    assert cache.report() == {"single": {"cond": {"computed": 2, "skipped": 1}}}


def test_a_recomputed_residual_overwrites_the_old_one():
    """A computed call writes its residual into the slot's tensor: never two full-size residuals of
    one slot at once (a new one is allocated only when the old does not fit, after freeing it)."""
    cache = ResidualCache(toy_plan({"cond": "CCsC"}, "SSSS"))
    run(cache, 0, "cond", "single", 1.0)
    first = cache._residuals[("single", "cond")]
    storage = first.data_ptr()
    run(cache, 1, "cond", "single", 4.0)
    assert cache._residuals[("single", "cond")] is first and first.data_ptr() == storage
    assert torch.equal(first, full(4.0))
    assert torch.equal(run(cache, 2, "cond", "single", 1.0), full(5.0))  # skip reads the new residual
    # a float32 residual from a bf16 block input (block 0): the old float32 residual still fits
    cache.begin_call(3, "cond", "single")
    cache.run(full(2.0).bfloat16(), lambda h: 2 * h.float())
    assert cache._residuals[("single", "cond")] is first and torch.equal(first, full(2.0))


def test_cond_and_uncond_keep_separate_residuals():
    cache = ResidualCache(toy_plan({"cond": "Cs", "uncond": "Cs"}, "SS"))
    run(cache, 0, "cond", "single", 1.0)
    run(cache, 0, "uncond", "single", 10.0)
    assert torch.equal(run(cache, 1, "cond", "single", 5.0), full(6.0))
    assert torch.equal(run(cache, 1, "uncond", "single", 5.0), full(15.0))


def test_aligned_mode_keeps_one_slot_per_expert():
    cache = ResidualCache(toy_plan({"cond": "CsCs"}, "HHLL", mode="aligned"))
    run(cache, 0, "cond", "high", 1.0)
    assert torch.equal(run(cache, 1, "cond", "high", 5.0), full(6.0))
    run(cache, 2, "cond", "low", 4.0)
    assert torch.equal(run(cache, 3, "cond", "low", 5.0), full(9.0))  # low's own residual 4
    assert cache.report() == {
        "high": {"cond": {"computed": 1, "skipped": 1}},
        "low": {"cond": {"computed": 1, "skipped": 1}},
    }


def test_official_mode_shares_the_slot_across_experts():
    cache = ResidualCache(toy_plan({"cond": "CsS"}, "HLL", mode="official"))
    run(cache, 0, "cond", "high", 1.0)
    # upstream: the low-noise expert reuses the high-noise expert's residual
    assert torch.equal(run(cache, 1, "cond", "low", 5.0), full(6.0))


def test_skip_before_any_residual_raises():
    cache = ResidualCache(toy_plan({"cond": "CsC"}, "HLL", mode="aligned"))
    run(cache, 0, "cond", "high", 1.0)
    with pytest.raises(ResidualCacheError, match="no residual was computed"):
        run(cache, 1, "cond", "low", 5.0)


def test_shape_mismatch_raises():
    cache = ResidualCache(toy_plan({"cond": "Cs"}, "SS"))
    run(cache, 0, "cond", "single", 1.0)
    cache.begin_call(1, "cond", "single")
    with pytest.raises(
        ResidualCacheError, match=r"shape \(1, 3, 2\) but the block input at step 1 has \(1, 4, 2\)"
    ):
        cache.run(torch.ones(1, 4, 2), double)


def test_contract_violations_raise():
    cache = ResidualCache(toy_plan({"cond": "CC"}, "HL"))
    with pytest.raises(ResidualCacheError, match="without begin_call"):
        cache.run(full(1.0), double)
    with pytest.raises(ResidualCacheError, match="expects the low expert at step 1 but the loop runs high"):
        cache.begin_call(1, "cond", "high")
    with pytest.raises(ResidualCacheError, match="not in the 2-step MagCache plan"):
        cache.begin_call(2, "cond", "low")
    run(cache, 0, "cond", "high", 1.0)
    with pytest.raises(ResidualCacheError, match="ran twice"):
        cache.begin_call(0, "cond", "high")


def test_never_skipping_cache_equals_no_cache():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    # a threshold no ratio can pass: every call computes
    config = MagCacheConfig(thresh=1e-12, K=2, retention=0.1, mode="aligned")
    timesteps = [999, 950, 880, 700, 400]
    p = plan("t2v-A14B", timesteps, 0.875, config, official_curve("t2v-A14B", False))
    assert p.forwards == p.dense_forwards
    cache, plain = ResidualCache(p), NoCache()
    h = torch.randn(1, 5, 8)
    with torch.no_grad():
        for c in p.calls:
            cache.begin_call(c.step, c.branch, c.expert)
            plain.begin_call(c.step, c.branch, c.expert)
            h_in = h + c.step
            assert torch.equal(cache.run(h_in, blocks), plain.run(h_in, blocks))


def test_follows_a_real_plan_and_reports_it():
    p = plan(
        "ti2v-5B", list(range(999, 0, -20)), None, preset_config("ti2v-5B"), official_curve("ti2v-5B", False)
    )
    cache = ResidualCache(p)
    for c in p.calls:
        run(cache, c.step, c.branch, c.expert, float(c.step))
    expected = {}
    for b in ("cond", "uncond"):
        fw, dense = p.count(branch=b)
        expected[b] = {"computed": fw, "skipped": dense - fw}
    assert cache.report() == {"single": expected} and fw < dense


# ------------------------------------------------------------------------------- CalibrationRecorder

# residual = h for the doubling toy; tokens of the cond branch per step (2 tokens, dim 2)
COND = [
    [[3.0, 4.0], [0.0, 1.0]],  # norms 5, 1
    [[6.0, 8.0], [3.0, 0.0]],  # norms 10, 3: ratios 2, 3; cos distances 0 (parallel), 1 (orthogonal)
    [[3.0, 4.0], [0.0, -3.0]],  # norms 5, 3: ratios 0.5, 1; cos distances 0, 1
]


def record(scale_uncond: float = 1.0, experts: str = "HHL") -> CalibrationRecorder:
    rec = CalibrationRecorder()
    names = {"H": "high", "L": "low"}
    for step, tokens in enumerate(COND):
        h = torch.tensor([tokens])
        for branch, value in (("cond", h), ("uncond", h * scale_uncond ** (step + 1))):
            rec.begin_call(step, branch, names[experts[step]])
            assert torch.equal(rec.run(value, double), 2 * value)  # never skips
    return rec


PROVENANCE = {
    "task": "t2v-A14B",
    "shift": 12.0,
    "boundary": 0.875,
    "size": "832*480",
    "solver": "unipc",
    "dtype": "bfloat16",
    "prompts": ["a cat"],
}


def test_recorder_gives_hand_computed_statistics():
    rec = record(scale_uncond=2.0)
    data = rec.to_json(PROVENANCE)
    # cond: gamma = mean(2, 3) = 2.5, std = 0.70711 (unbiased); then mean(0.5, 1) = 0.75, std 0.35355
    # uncond is the same tokens scaled by 2^(step+1): its ratios are twice cond's
    assert data["mag_ratios"] == [2.5, 5.0, 0.75, 1.5]
    assert data["mag_std"] == [0.70711, 1.41421, 0.35355, 0.70711]
    assert data["cos_dis"] == [0.5, 0.5, 0.5, 0.5]
    assert data["steps"] == 3 and data["high_noise_steps"] == 2
    assert data["per_expert"] == {
        "high": {"steps": [1], "cond": [2.5], "uncond": [5.0]},
        "low": {"steps": [2], "cond": [0.75], "uncond": [1.5]},
    }
    assert data["provenance"]["steps"] == 3 and data["provenance"]["prompts"] == ["a cat"]


def test_calibration_json_loads_back_as_a_curve(tmp_path):
    path = tmp_path / "calibration.json"
    save_calibration(path, record().to_json(PROVENANCE))
    curve = load_ratios_file(path)
    assert curve.ratios == (2.5, 2.5, 0.75, 0.75) and curve.steps == 3
    assert (curve.task, curve.shift, curve.boundary, curve.high_noise_steps) == ("t2v-A14B", 12.0, 0.875, 2)
    # and it drives a plan
    p = plan("t2v-A14B", [999, 990, 500], 0.875, MagCacheConfig(retention=0.0), curve, shift=12.0)
    assert p.steps == 3 and p.warnings == ()


def test_average_over_prompts():
    avg = average([record(scale_uncond=1.0).recording(), record(scale_uncond=3.0).recording()])
    data = avg.to_json(PROVENANCE)
    # uncond ratios: 1x and 3x cond's -> mean 2x cond's
    assert data["mag_ratios"] == [2.5, 5.0, 0.75, 1.5]
    assert np.allclose(data["mag_std"], [0.70711, 1.41421, 0.35355, 0.70711])
    with pytest.raises(ValueError, match="differ in steps, branches or experts"):
        average([record().recording(), record(experts="HLL").recording()])


def test_recorder_errors():
    with pytest.raises(ValueError, match="provenance lacks size, solver, dtype, prompts"):
        record().to_json({"task": "t2v-A14B", "shift": 12.0})
    rec = CalibrationRecorder()
    for step, branch in ((0, "cond"), (0, "uncond")):
        rec.begin_call(step, branch, "high")
        rec.run(full(1.0), double)
    with pytest.raises(ValueError, match="recorded 1 step"):
        rec.to_json(PROVENANCE)
    rec.begin_call(1, "uncond", "high")
    rec.run(full(1.0), double)
    with pytest.raises(
        ValueError, match=r"calibration is incomplete: no sample for \(step, branch\) \[\(1, 'cond'\)\]"
    ):
        rec.to_json(PROVENANCE)
    rec.begin_call(2, "cond", "high")
    with pytest.raises(RuntimeError, match="residual shape changed"):
        rec.run(torch.ones(1, 4, 2), double)
