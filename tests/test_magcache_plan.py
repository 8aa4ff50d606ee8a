"""MagCache plans: upstream's schedules (reference §2), the official goldens, the aligned fixes, reporting."""

from __future__ import annotations

import json

import numpy as np
import pytest
from goldens import entry, golden_params, tensors

from magcache_generate.magcache.plan import (
    Plan,
    UnreachableSpeedupError,
    expert_for,
    plan,
    preset_config,
    script_high_noise_steps,
    threshold_for_speedup,
)
from magcache_generate.magcache.policy import FRESH, MagCacheConfig, MagCacheConfigError, decide
from magcache_generate.magcache.ratios import MagCurve, official_curve
from magcache_generate.magcache.report import plan_json, render_plan

# Wan's task configs (shift, expert boundary); the goldens' manifest does not repeat them.
TASK_SHIFT = {"t2v-A14B": 12.0, "i2v-A14B": 5.0, "ti2v-5B": 5.0}
TASK_BOUNDARY = {"t2v-A14B": 0.875, "i2v-A14B": 0.9, "ti2v-5B": None}


def unipc_timesteps(steps: int, shift: float) -> list[int]:
    """Wan's UniPC grid: sigma linspace(float32(0.999), 0, N+1)[:-1], shifted, x1000, truncated."""
    sigmas = np.linspace(0.9990000128746033, 0.0, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * 1000).astype(np.int64).tolist()


def make_plan(task: str, steps: int, mode: str = "official", has_image: bool = False, **overrides) -> Plan:
    config = preset_config(task, mode)
    if overrides:
        config = MagCacheConfig(**{**config.__dict__, **overrides})
    shift = TASK_SHIFT[task]
    curve = official_curve(task, has_image)
    return plan(task, unipc_timesteps(steps, shift), TASK_BOUNDARY[task], config, curve, shift=shift)


# ------------------------------------------------------------------ reference §2: official schedules

T2V_SKIPPED = [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 32, 34, 36]
TI2V_TEXT_SKIPPED = [
    10,
    11,
    13,
    14,
    16,
    17,
    19,
    20,
    22,
    23,
    25,
    26,
    28,
    29,
    31,
    32,
    34,
    35,
    37,
    39,
    41,
    43,
    45,
    47,
    49,
]
TI2V_IMAGE_SKIPPED = [
    10,
    11,
    13,
    14,
    16,
    17,
    19,
    20,
    22,
    23,
    25,
    26,
    28,
    29,
    31,
    32,
    34,
    35,
    37,
    39,
    41,
    43,
    45,
    49,
]


@pytest.mark.parametrize(
    ("task", "has_image", "cond", "uncond", "forwards", "dense"),
    [
        ("t2v-A14B", False, T2V_SKIPPED, T2V_SKIPPED, 52, 80),
        (
            "i2v-A14B",
            True,
            [18, 19, 21, 22, 24, 25, 27, 29, 31, 33],
            [17, 18, 20, 21, 23, 24, 26, 27, 29, 31, 33],
            59,
            80,
        ),
        ("ti2v-5B", False, TI2V_TEXT_SKIPPED, TI2V_TEXT_SKIPPED, 50, 100),
        ("ti2v-5B", True, TI2V_IMAGE_SKIPPED, TI2V_IMAGE_SKIPPED, 52, 100),
    ],
)
def test_official_default_schedules(task, has_image, cond, uncond, forwards, dense):
    steps = 50 if task == "ti2v-5B" else 40
    p = make_plan(task, steps, has_image=has_image)
    assert p.skipped_steps("cond") == cond
    assert p.skipped_steps("uncond") == uncond
    assert (p.forwards, p.dense_forwards) == (forwards, dense)
    assert p.warnings == () and p.no_skip_reason is None


def test_official_t2v_per_expert_counts():
    p = make_plan("t2v-A14B", 40)
    assert p.experts == ["high"] * 26 + ["low"] * 14
    assert p.count(expert="high") == (30, 52) and p.count(expert="low") == (22, 28)
    assert make_plan("i2v-A14B", 40, has_image=True).count(expert="high") == (30, 30)


# task, steps, H on Wan's grid, H on upstream's own grid, forwards, dense  (reference §2 sweep)
SWEEP = [
    ("t2v-A14B", 20, 13, 13, 26, 40),
    ("t2v-A14B", 30, 19, 20, 40, 60),
    ("t2v-A14B", 40, 26, 26, 52, 80),
    ("t2v-A14B", 50, 32, 32, 67, 100),
    ("t2v-A14B", 60, 38, 39, 79, 120),
    ("i2v-A14B", 20, 8, 8, 30, 40),
    ("i2v-A14B", 30, 11, 11, 43, 60),
    ("i2v-A14B", 40, 15, 15, 59, 80),
    ("i2v-A14B", 50, 18, 19, 74, 100),
    ("i2v-A14B", 60, 22, 22, 87, 120),
    ("ti2v-5B", 20, None, None, 20, 40),
    ("ti2v-5B", 30, None, None, 30, 60),
    ("ti2v-5B", 40, None, None, 40, 80),
    ("ti2v-5B", 50, None, None, 50, 100),
    ("ti2v-5B", 60, None, None, 62, 120),
]


@pytest.mark.parametrize(("task", "steps", "h_wan", "h_script", "forwards", "dense"), SWEEP)
def test_official_step_count_sweep(task, steps, h_wan, h_script, forwards, dense):
    p = make_plan(task, steps, has_image=task == "i2v-A14B")
    assert (p.forwards, p.dense_forwards) == (forwards, dense)
    if h_wan is not None:
        assert p.experts.count("high") == h_wan
        assert script_high_noise_steps(steps, TASK_SHIFT[task], TASK_BOUNDARY[task]) == h_script
        assert any("own sigma grid" in w for w in p.warnings) == (h_wan != h_script)


@pytest.mark.parametrize(
    ("task", "steps", "forced"),
    [
        ("t2v-A14B", 40, lambda cnt: cnt < 20 or 52 <= cnt <= 63),  # 28 * 0.4 + 52 = 63.2
        (
            "t2v-A14B",
            30,
            lambda cnt: cnt < 16 or 40 <= cnt <= 48,
        ),  # split 40 (own grid): 20 * 0.4 + 40 = 48.0
        ("i2v-A14B", 40, lambda cnt: cnt < 35),  # int(30 + 50 * 0.1)
        ("ti2v-5B", 50, lambda cnt: cnt < 20),  # int(100 * 0.2)
    ],
)
def test_official_windows_are_in_call_units(task, steps, forced):
    p = make_plan(task, steps, has_image=task == "i2v-A14B")
    assert [c.forced for c in p.calls] == [forced(cnt) for cnt in range(2 * steps)]


# --------------------------------------------------------------------------------- official goldens


@pytest.mark.parametrize("name", golden_params("magcache"))
def test_official_plan_matches_golden(name):
    e, t = entry(name), tensors(name)
    args = e["parsed_args"]
    task, steps, shift = e["task"], args["sample_steps"], args["sample_shift"]
    if args["sample_solver"] == "unipc":
        timesteps = unipc_timesteps(steps, shift)
        if "sched.timesteps" in t:
            assert timesteps == t["sched.timesteps"].tolist()
    else:  # another solver's grid: take the loop's timesteps the golden recorded
        timesteps = t["sched.timesteps"].tolist()
    config = MagCacheConfig(args["magcache_thresh"], args["magcache_K"], args["retention_ratio"], "official")
    curve = official_curve(task, args["image"] is not None)
    assert len(curve.ratios) == e["init_magcache_args"]["n_mag_ratios_official"]
    p = plan(task, timesteps, TASK_BOUNDARY[task], config, curve, shift=shift)

    assert len(p.calls) == e["n_calls"]
    assert [c.computed for c in p.calls] == t["call.computed"].tolist()
    assert [i for i, c in enumerate(p.calls) if not c.computed] == e["skipped_call_indices"]
    assert [c.branch == "cond" for c in p.calls] == t["call.is_cond"].tolist()
    assert [c.expert == "high" for c in p.calls] == t["call.is_high_noise_expert"].tolist()
    assert [c.gamma for c in p.calls] == t["magcache.mag_ratios"].tolist()
    if e.get("high_noise_steps"):
        assert p.experts.count("high") == e["high_noise_steps"]["real_schedule"]
        assert (
            script_high_noise_steps(steps, shift, TASK_BOUNDARY[task])
            == e["high_noise_steps"]["magcache_get_timesteps"]
        )
    # the accumulators after every call, bit for bit (upstream resets them after its last call)
    state = {"cond": FRESH, "uncond": FRESH}
    for i, c in enumerate(p.calls[:-1]):
        _, state[c.branch] = decide(config, state[c.branch], c.gamma, forced=c.forced)
        assert [state[b].err for b in ("cond", "uncond")] == t["call.accumulated_err"][i].tolist()
        assert [state[b].steps for b in ("cond", "uncond")] == t["call.accumulated_steps"][i].tolist()
        assert [state[b].ratio for b in ("cond", "uncond")] == t["call.accumulated_ratio"][i].tolist()


# ------------------------------------------------------------------------------------- aligned mode


def test_aligned_defaults_at_calibrated_steps():
    t2v = make_plan("t2v-A14B", 40, mode="aligned")
    assert t2v.skipped_steps("cond") == t2v.skipped_steps("uncond") == T2V_SKIPPED
    i2v = make_plan("i2v-A14B", 40, mode="aligned", has_image=True)
    # upstream lets uncond skip step 17 out of phase with cond; aligned keeps the branches together
    assert (
        i2v.skipped_steps("cond") == i2v.skipped_steps("uncond") == [18, 19, 21, 22, 24, 25, 27, 29, 31, 33]
    )
    assert i2v.count(expert="high") == (30, 30)
    ti2v = make_plan("ti2v-5B", 50, mode="aligned")
    assert ti2v.skipped_steps("cond") == TI2V_TEXT_SKIPPED


@pytest.mark.parametrize("task", ["t2v-A14B", "i2v-A14B"])
@pytest.mark.parametrize("steps", [20, 30, 40, 50, 60])
def test_aligned_phase_starts_and_branches_in_phase(task, steps):
    p = make_plan(task, steps, mode="aligned", has_image=task == "i2v-A14B")
    switch = p.experts.index("low")
    for c in p.calls:
        if c.step in (0, switch):
            assert c.computed and c.forced
    assert p.skipped_steps("cond") == p.skipped_steps("uncond")
    assert not any("dip lands" in w for w in p.warnings)


def test_aligned_state_is_fresh_per_expert_and_official_carries_it():
    # unit ratios: only K limits a run of skips; 8 high-noise steps, then 2 low-noise ones
    curve = MagCurve("unit", (1.0,) * 18)
    timesteps = [990, 900, 800, 700, 600, 500, 400, 310, 200, 100]

    def row(p: Plan, branch: str) -> str:
        return "".join("C" if c.computed else "s" for c in p.calls if c.branch == branch)

    official = plan("t2v-A14B", timesteps, 0.3, MagCacheConfig(0.06, 2, 0.2, "official"), curve, shift=1.0)
    # upstream windows (split 16): calls 0-2 and 16; uncond's run of skips crosses the switch, so its
    # first low-noise call (step 8) is skipped with the high-noise expert's residual
    assert row(official, "cond") == "CCssCssCCs"
    assert row(official, "uncond") == "CssCssCssC"
    aligned = plan("t2v-A14B", timesteps, 0.3, MagCacheConfig(0.06, 2, 0.2, "aligned"), curve)
    # per phase: round(0.2*8) = 2 and max(1, round(0.2*2)) = 1 forced steps, fresh state at the switch
    assert row(aligned, "cond") == row(aligned, "uncond") == "CCssCssCCs"


def test_aligned_uses_calibration_switch_for_a_bare_list():
    shipped = official_curve("t2v-A14B", False)
    bare = MagCurve("bare", shipped.ratios)  # no metadata: the switch is found from the dip
    a = make_plan("t2v-A14B", 30, mode="aligned")
    b = plan("t2v-A14B", unipc_timesteps(30, 12.0), 0.875, preset_config("t2v-A14B"), bare, shift=12.0)
    assert [c.computed for c in a.calls] == [c.computed for c in b.calls]


# ----------------------------------------------------------------------------- warnings and errors


def test_warnings_for_curves_that_do_not_fit():
    p = make_plan("t2v-A14B", 50)
    assert any("calibrated for 40 steps, this run has 50" in w for w in p.warnings)
    assert any("dip lands at step 33; the loop switches experts at step 32" in w for w in p.warnings)
    wrong = plan(
        "i2v-A14B",
        unipc_timesteps(40, 5.0),
        0.9,
        preset_config("i2v-A14B"),
        official_curve("t2v-A14B", False),
    )
    assert any("calibrated for t2v-A14B, this run is i2v-A14B" in w for w in wrong.warnings)
    text_curve = official_curve("ti2v-5B", False)
    image = plan(
        "ti2v-5B", unipc_timesteps(50, 5.0), None, preset_config("ti2v-5B"), text_curve, has_image=True
    )
    assert any("without an input image" in w for w in image.warnings)


def test_no_skip_reason_at_four_steps():
    p = make_plan("i2v-A14B", 4, mode="aligned", has_image=True)
    assert p.forwards == p.dense_forwards == 8
    assert "skips nothing at 4 steps" in p.no_skip_reason
    forced_only = make_plan("t2v-A14B", 4, mode="aligned", retention=0.9)
    assert "are forced to compute" in forced_only.no_skip_reason
    ti2v = make_plan("ti2v-5B", 4, mode="aligned")
    assert ti2v.forwards == 8 and "skips nothing at 4 steps" in ti2v.no_skip_reason
    # official mode resamples by nearest index, which keeps one-calibration-step ratios: flagged
    official = make_plan("t2v-A14B", 4, mode="official")
    assert any("far fewer than the curve's 40" in w for w in official.warnings)


def test_plan_errors():
    with pytest.raises(ValueError, match="needs the run's shift"):
        plan(
            "t2v-A14B", [999, 500], 0.875, MagCacheConfig(mode="official"), official_curve("t2v-A14B", False)
        )
    with pytest.raises(ValueError, match="unknown task"):
        plan("t2v-1.3B", [999], None, MagCacheConfig(), official_curve("t2v-A14B", False))
    with pytest.raises(ValueError, match="needs an expert boundary"):
        plan("t2v-A14B", [999], None, MagCacheConfig(), official_curve("t2v-A14B", False))
    # int(2N*r) = 1 forces only call 0: upstream would skip uncond's first call with no residual
    with pytest.raises(MagCacheConfigError, match="first uncond call"):
        make_plan("ti2v-5B", 4, retention=0.2)


def test_expert_for_is_inclusive():
    assert expert_for(875, 0.875) == "high" and expert_for(874, 0.875) == "low"
    assert expert_for(900, 0.9) == "high" and expert_for(500, None) == "single"


# ---------------------------------------------------------------------------------------- reporting


def test_plan_json_shape():
    p = make_plan("t2v-A14B", 40)
    data = json.loads(json.dumps(plan_json(p)))
    assert list(data) == ["task", "steps", "mode", "forwards", "dense_forwards", "calls"]
    assert (data["task"], data["steps"], data["mode"], data["forwards"], data["dense_forwards"]) == (
        "t2v-A14B",
        40,
        "official",
        52,
        80,
    )
    assert len(data["calls"]) == 80
    assert data["calls"][0] == {"step": 0, "branch": "cond", "expert": "high", "computed": True}
    assert data["calls"][21] == {"step": 10, "branch": "uncond", "expert": "high", "computed": False}
    assert all(list(c) == ["step", "branch", "expert", "computed"] for c in data["calls"])


def test_render_plan_rows():
    text = render_plan(make_plan("t2v-A14B", 40))
    assert "  expert : " + "H" * 26 + "L" * 14 in text
    assert "  cond   : CCCCCCCCCCssCssCssCssCssCsCCCCCCsCsCsCCC" in text
    assert "  step   : " + "0123456789" * 4 in text
    assert "forwards 52 of 80 dense -> ideal speedup 1.538x" in text
    assert "high-noise: 30/52 forwards" in text and "low-noise: 22/28 forwards" in text
    assert "expert :" not in render_plan(make_plan("ti2v-5B", 50))


def test_threshold_for_speedup_is_the_smallest_passing_value():
    task, config = "t2v-A14B", preset_config("t2v-A14B", "official")
    args = (task, unipc_timesteps(40, 12.0), 0.875, config, official_curve(task, False))

    def speedup(thresh):
        p = plan(
            *args[:3], MagCacheConfig(thresh, config.K, config.retention, "official"), args[4], shift=12.0
        )
        return p.ideal_speedup

    thresh = threshold_for_speedup(1.5, *args, shift=12.0)
    assert speedup(thresh) >= 1.5 > speedup(thresh - 2e-6)
    assert thresh <= 0.06  # the preset reaches 1.538x
    with pytest.raises(UnreachableSpeedupError, match=r"out of reach.*K=2, retention=0\.4"):
        threshold_for_speedup(3.0, *args, shift=12.0)
    with pytest.raises(ValueError, match="must be > 1"):
        threshold_for_speedup(1.0, *args, shift=12.0)


def test_presets():
    assert preset_config("t2v-A14B") == MagCacheConfig(0.06, 2, 0.4, "aligned")
    assert preset_config("i2v-A14B", "official") == MagCacheConfig(0.06, 2, 0.1, "official")
    assert preset_config("ti2v-5B") == MagCacheConfig(0.06, 2, 0.2, "aligned")
