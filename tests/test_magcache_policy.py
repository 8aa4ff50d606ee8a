"""MagCache's pure parts: the decide() rule, its config, the shipped curves and their resampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from magcache_generate.magcache.policy import FRESH, BranchState, MagCacheConfig, MagCacheConfigError, decide
from magcache_generate.magcache.ratios import (
    RatiosFileError,
    calibration_high_noise_steps,
    find_dip,
    interpolate_per_expert,
    interpolate_whole,
    load_ratios_file,
    nearest_interp,
    official_curve,
    official_curves,
    resample_magnitude,
)


def unipc_timesteps(steps: int, shift: float) -> list[int]:
    """Wan's UniPC grid: sigma linspace(float32(0.999), 0, N+1)[:-1], shifted, x1000, truncated."""
    sigmas = np.linspace(0.9990000128746033, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * 1000).astype(np.int64).tolist()


def run_rule(config: MagCacheConfig, gammas: list[float]) -> tuple[list[bool], BranchState]:
    state, skips = FRESH, []
    for g in gammas:
        skip, state = decide(config, state, g)
        skips.append(skip)
    return skips, state


# --------------------------------------------------------------------------------------------- decide


def test_unit_ratios_skip_until_k_then_compute():
    skips, _ = run_rule(MagCacheConfig(thresh=0.06, K=2), [1.0] * 7)
    assert skips == [True, True, False, True, True, False, True]
    skips, _ = run_rule(MagCacheConfig(thresh=0.06, K=3), [1.0] * 5)
    assert skips == [True, True, True, False, True]


def test_hand_computed_accumulation_and_reset():
    config = MagCacheConfig(thresh=0.1, K=3)
    skip, s1 = decide(config, FRESH, 0.96)  # R = 0.96, E = 0.04
    assert skip and s1.steps == 1 and s1.ratio == pytest.approx(0.96) and s1.err == pytest.approx(0.04)
    skip, s2 = decide(config, s1, 0.98)  # R = 0.9408, E = 0.04 + 0.0592
    assert skip and s2.steps == 2 and s2.ratio == pytest.approx(0.9408) and s2.err == pytest.approx(0.0992)
    skip, s3 = decide(config, s2, 0.99)  # R = 0.931392, E = 0.167808 >= 0.1 -> compute and reset
    assert not skip and s3 == FRESH
    # the gamma that triggered the reset is not carried into the next run
    skip, s4 = decide(config, s3, 0.98)
    assert skip and s4.ratio == pytest.approx(0.98) and s4.err == pytest.approx(0.02)


def test_threshold_is_strict():
    # binary fractions: R = 0.75, E = |1 - 0.75| = 0.25 exactly
    skip, state = decide(MagCacheConfig(thresh=0.25, K=2), FRESH, 0.75)
    assert not skip and state == FRESH
    skip, state = decide(MagCacheConfig(thresh=math.nextafter(0.25, 1), K=2), FRESH, 0.75)
    assert skip and state == BranchState(0.75, 1, 0.25)


def test_ratio_above_one_counts_as_error_too():
    skip, state = decide(MagCacheConfig(thresh=0.06), FRESH, 1.25)
    assert not skip and state == FRESH


def test_forced_call_neither_accumulates_nor_resets():
    config = MagCacheConfig(thresh=0.06, K=2)
    mid_run = BranchState(ratio=0.99, steps=1, err=0.01)
    assert decide(config, mid_run, 0.5, forced=True) == (False, mid_run)
    assert decide(config, FRESH, 1.0, forced=True) == (False, FRESH)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thresh": 0}, "MagCache thresh 0 must be > 0"),
        ({"thresh": -0.1}, r"MagCache thresh -0\.1 must be > 0"),
        ({"thresh": math.nan}, "MagCache thresh nan must be > 0"),
        ({"thresh": math.inf}, "MagCache thresh inf must be > 0"),
        ({"thresh": "0.06"}, r"MagCache thresh '0\.06' must be > 0"),
        ({"K": 0}, "MagCache K 0 must be >= 1"),
        ({"K": 1.5}, r"MagCache K 1\.5 must be >= 1"),
        ({"K": True}, "MagCache K True must be >= 1"),
        ({"retention": -0.1}, r"MagCache retention -0\.1 must be in \[0, 1\)"),
        ({"retention": 1.0}, r"MagCache retention 1\.0 must be in \[0, 1\)"),
        ({"mode": "fast"}, "unknown MagCache mode 'fast'; use aligned"),
        ({"retention": 0.0, "mode": "official"}, "retention 0 is refused in official mode"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(MagCacheConfigError, match=message):
        MagCacheConfig(**kwargs)
    assert issubclass(MagCacheConfigError, ValueError)


def test_config_accepts_retention_zero_in_aligned_mode():
    assert MagCacheConfig(retention=0.0, mode="aligned").retention == 0.0


# --------------------------------------------------------------------------------------- resampling


def numpy_nearest(values, n):
    """Upstream's numpy formulation, as a reference."""
    if n == 1:
        return [values[-1]]
    idx = np.round(np.arange(n) * ((len(values) - 1) / (n - 1))).astype(int)
    return [values[i] for i in idx]


def test_nearest_interp_rounds_half_to_even():
    src = [10, 11, 12, 13, 14, 15]
    assert nearest_interp(src, 3) == [10, 12, 15]  # 1 * 2.5 = 2.5 -> 2 (half-up would give 13)
    assert nearest_interp([0, 1, 2], 5) == [0, 0, 1, 2, 2]  # 0.5 -> 0, 1.5 -> 2
    assert nearest_interp(src, 6) == src
    assert nearest_interp(src, 1) == [15]  # upstream quirk: a single entry takes the last value


def test_nearest_interp_matches_numpy_reference():
    for length in range(2, 60, 3):
        src = list(range(length))
        for n in range(1, 130, 7):
            assert nearest_interp(src, n) == numpy_nearest(src, n), (length, n)


def test_interpolate_whole_resamples_columns_separately():
    padded = [1.0, 1.0] + [v for s in range(1, 6) for v in (s / 10, -s / 10)]  # cond > 0, uncond < 0
    assert interpolate_whole(padded, 6) == padded  # already 2N long
    out = interpolate_whole(padded, 3)
    assert out == [1.0, 1.0, 0.2, -0.2, 0.5, -0.5]  # indices 0, round(2.5) = 2, 5 of each column


@pytest.mark.parametrize("key", ["wan2.2/t2v-A14B", "wan2.2/i2v-A14B"])
@pytest.mark.parametrize("steps", [20, 30, 50])
def test_per_expert_interpolation_keeps_dip_on_the_switch(key, steps):
    curve = official_curves()[key]
    high = sum(t >= 1000 * curve.boundary for t in unipc_timesteps(steps, curve.shift))
    out = interpolate_per_expert(curve.padded, curve.high_noise_steps, high, steps - high)
    assert len(out) == 2 * steps
    assert find_dip(out) == high
    dip = 2 * curve.high_noise_steps
    assert out[2 * high : 2 * high + 2] == curve.padded[dip : dip + 2]  # the measured cross-expert pair
    assert out[:2] == [1.0, 1.0]
    # magnitude resampling keeps each phase's total change per branch (product of gammas after its start)
    for branch in (0, 1):
        for ours, theirs in (
            (out[branch : 2 * high : 2], curve.padded[branch:dip:2]),
            (out[2 * high + branch :: 2], curve.padded[dip + branch :: 2]),
        ):
            assert math.isclose(math.prod(ours[1:]), math.prod(theirs[1:]), rel_tol=1e-9)


def test_magnitude_resampling_compounds_ratios_over_skipped_calibration_steps():
    column = [1.0, 0.9, 0.9, 0.9, 0.9]
    assert resample_magnitude(column, 5) == column
    halved = resample_magnitude(column, 3)  # each new step spans two calibration steps
    assert halved[0] == 1.0 and all(math.isclose(g, 0.81) for g in halved[1:])
    doubled = resample_magnitude(column, 9)
    assert all(math.isclose(g, 0.9**0.5) for g in doubled[1:])


def test_whole_interpolation_misplaces_the_dip_as_upstream():
    padded = official_curves()["wan2.2/t2v-A14B"].padded
    assert find_dip(interpolate_whole(padded, 40)) == 26
    assert find_dip(interpolate_whole(padded, 20)) is None  # reference §2 sweep: dip lost
    assert find_dip(interpolate_whole(padded, 50)) == 33  # switch is at 32


# ----------------------------------------------------------------------------------------- curves


def test_official_curves_and_their_calibration_switch():
    t2v, i2v = official_curve("t2v-A14B", False), official_curve("i2v-A14B", True)
    assert (t2v.key, t2v.steps, len(t2v.padded), t2v.high_noise_steps) == ("wan2.2/t2v-A14B", 40, 80, 26)
    assert (i2v.key, i2v.steps, i2v.high_noise_steps) == ("wan2.2/i2v-A14B", 40, 15)
    assert t2v.ratios[50:52] == (0.65523, 0.65252) and i2v.ratios[28:30] == (0.91076, 0.91046)
    assert official_curve("ti2v-5B", False).key == "wan2.2/ti2v-5B/t2v"
    assert official_curve("ti2v-5B", True).key == "wan2.2/ti2v-5B/i2v"
    assert official_curve("ti2v-5B", True).high_noise_steps is None
    assert "source" in t2v.provenance and t2v.provenance["source_line"] == 695
    assert calibration_high_noise_steps(40, 12.0, 0.875) == 26
    assert calibration_high_noise_steps(40, 5.0, 0.9) == 15
    with pytest.raises(ValueError, match="tasks: t2v-A14B"):
        official_curve("t2v-1.3B", False)


def test_load_bare_list_and_official_formats(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([0.99, 0.98, 0.97, 0.96]))
    curve = load_ratios_file(bare)
    assert curve.ratios == (0.99, 0.98, 0.97, 0.96) and curve.steps == 3 and curve.task is None

    shipped = official_curve("i2v-A14B", True)
    official = tmp_path / "official.json"
    i2v_entry = {
        "ratios": list(shipped.ratios),
        "sample_steps": 40,
        "wan_defaults": {"sample_shift": 5.0, "boundary": 0.9},
    }
    official.write_text(json.dumps({"_meta": {}, "a": {"ratios": [1.0, 1.0]}, "wan2.2/i2v-A14B": i2v_entry}))
    loaded = load_ratios_file(official, key="wan2.2/i2v-A14B")
    assert loaded.ratios == shipped.ratios and loaded.high_noise_steps == 15 and loaded.task == "i2v-A14B"
    with pytest.raises(RatiosFileError, match=r"choose one key of: a, wan2\.2/i2v-A14B"):
        load_ratios_file(official)

    single = tmp_path / "single.json"
    single.write_text(json.dumps({"ratios": [0.9, 0.9], "sample_steps": 2}))
    assert load_ratios_file(single).steps == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[0.99, 0.98, 0.97]", "is odd"),
        ("[0.99, -0.98]", "ratio #1 is -0.98"),
        ("[0.99, NaN]", "ratio #1 is nan"),
        ("[0.99, true]", "ratio #1 is True"),
        ("[]", "non-empty list"),
        ('{"mag_ratios": [0.9, 0.9], "steps": 3}', "steps 3 needs 4 mag_ratios"),
        ('{"other": 1}', "no 'mag_ratios' or 'ratios'"),
        ("[0.99, ", "not valid JSON"),
    ],
)
def test_load_ratios_file_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(RatiosFileError, match=message) as info:
        load_ratios_file(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_ratios_file_missing(tmp_path):
    with pytest.raises(RatiosFileError, match="not found"):
        load_ratios_file(tmp_path / "nope.json")
