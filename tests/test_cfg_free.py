"""CFG-free steps (guide scale 1): the loop runs only the conditional forward, the MagCache plan has one
branch for those steps (per expert), `--magcache-plan --json` counts them, calibration copes."""

from __future__ import annotations

import json

import pytest
import torch

from magcache_generate import cli
from magcache_generate.magcache.calibration import CalibrationRecorder
from magcache_generate.magcache.plan import BRANCHES, plan
from magcache_generate.magcache.policy import MagCacheConfig, MagCacheConfigError
from magcache_generate.magcache.ratios import official_curve
from magcache_generate.magcache.report import plan_json, render_plan
from magcache_generate.magcache.residual_cache import ResidualCache
from magcache_generate.magcache.settings import make_plan
from magcache_generate.request import MagCacheOptions
from wan.guidance import branches_for, cfg_free_experts, uses_cfg
from wan.loading import load_transformer
from wan.sampling import sample
from wan.schedule import make_schedule
from wan.testing.dit import tiny_transformer_config, write_transformer_folder
from wan.testing.models import StaticModels

CFG = tiny_transformer_config("t2v")


class Counting(torch.nn.Module):
    """Wraps a transformer and counts its calls per context (cond / uncond)."""

    def __init__(self, inner, context, context_null):
        super().__init__()
        self.inner, self.calls = inner, []
        self.names = {id(context): "cond", id(context_null): "uncond"}

    def forward(self, x, t, context, y=None, *, cache=None):
        self.calls.append(self.names[id(context)])
        return self.inner(x, t, context, y, cache=cache)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {
        e: load_transformer(write_transformer_folder(root / e, CFG, seed=i))
        for i, e in enumerate(("high", "low"))
    }


def run(experts, guide_scale, solver="euler", steps=4, shift=5.0, cache=None, on_step=None):
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 2, 4, 4, generator=gen)
    context, context_null = (
        torch.randn(1, 5, CFG.text_dim, generator=gen),
        torch.randn(1, 7, CFG.text_dim, generator=gen),
    )
    counted = {e: Counting(m, context, context_null) for e, m in experts.items()}
    schedule = make_schedule(solver, steps, shift)
    options = {"guide_scale": guide_scale, "boundary": 0.875, "cache": cache, "on_step": on_step}
    out = sample(noise, schedule, StaticModels(counted), context, context_null, **options)
    return out, {e: m.calls for e, m in counted.items()}


def test_guidance_rule():
    assert not uses_cfg(1.0) and not uses_cfg(1.0 + 1e-7) and uses_cfg(1.01) and uses_cfg(0.0)
    assert branches_for(1.0) == ("cond",) and branches_for(3.5) == ("cond", "uncond")
    assert cfg_free_experts(("high", "low"), (3.0, 1.0)) == ["high"]


def test_cfg_free_runs_call_the_transformer_half_as_often(experts):
    seen = []
    _, dense = run(experts, (3.0, 4.0))
    lightning, free = run(experts, (1.0, 1.0), on_step=seen.append)
    assert sum(map(len, dense.values())) == 8 and sum(map(len, free.values())) == 4
    assert free == {"high": ["cond", "cond"], "low": ["cond", "cond"]}
    assert [s.branches for s in seen] == [("cond",)] * 4 and torch.isfinite(lightning).all()
    _, mixed = run(experts, (3.0, 1.0))  # (low, high): high-noise CFG-free, low-noise with CFG
    assert mixed == {"high": ["cond", "cond"], "low": ["cond", "uncond", "cond", "uncond"]}


def test_cfg_free_step_uses_the_conditional_prediction_only(experts):
    """Guide 1 without the uncond forward equals a run whose uncond is the cond prediction."""
    out_free, _ = run(experts, (1.0, 1.0))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 2, 4, 4, generator=gen)
    context = torch.randn(1, 5, CFG.text_dim, generator=gen)
    same = sample(
        noise,
        make_schedule("euler", 4, 5.0),
        StaticModels(experts),
        context,
        context,
        guide_scale=(1.5, 1.5),
        boundary=0.875,
    )
    torch.testing.assert_close(out_free, same, rtol=1e-5, atol=1e-5)  # cond == uncond: CFG is a no-op


def test_plan_with_per_expert_branches():
    timesteps = [int(t) for t in make_schedule("unipc", 40, 12.0).timesteps]
    curve = official_curve("t2v-A14B", False)
    config = MagCacheConfig(0.06, 2, 0.4)
    mixed = plan(
        "t2v-A14B", timesteps, 0.875, config, curve, shift=12.0, branches={"high": ("cond",), "low": BRANCHES}
    )
    assert mixed.dense_forwards == 40 + 14 and mixed.cfg_free_experts == ["high"]
    assert mixed.branches_at(0) == ("cond",) and mixed.branches_at(39) == BRANCHES
    assert not mixed.has_call(0, "uncond") and mixed.call(39, "uncond").expert == "low"
    full = plan("t2v-A14B", timesteps, 0.875, config, curve, shift=12.0)
    # the cond decisions do not depend on whether uncond runs
    assert [c.computed for c in mixed.calls if c.branch == "cond"] == [
        c.computed for c in full.calls if c.branch == "cond"
    ]
    assert "uncond : --------------------------" in render_plan(mixed)
    with pytest.raises(MagCacheConfigError, match=r"official mode .* aligned"):
        plan(
            "t2v-A14B",
            timesteps,
            0.875,
            MagCacheConfig(0.06, 2, 0.4, "official"),
            curve,
            shift=12.0,
            branches=("cond",),
        )


def lightning_plan():
    """The MagCache plan of the 4-step CFG-free Lightning recipe (Euler, shift 5, guide 1)."""
    timesteps = [int(t) for t in make_schedule("euler", 4, 5.0).timesteps]
    return make_plan(
        "t2v-A14B",
        timesteps,
        5.0,
        MagCacheOptions(enabled=True),
        False,
        lambda m: None,
        guide_scale=(1.0, 1.0),
    )


def test_lightning_plan_counts_four_forwards_and_says_why_nothing_skips():
    p = lightning_plan()
    assert (p.forwards, p.dense_forwards, p.cfg_free_experts) == (4, 4, ["high", "low"])
    assert "skips nothing at 4 steps" in p.no_skip_reason and "--magcache-calibrate" in p.no_skip_reason
    assert plan_json(p)["dense_forwards"] == 4


@pytest.mark.parametrize(
    ("argv", "forwards", "dense"),
    [
        ([], 52, 80),
        (["--distilled", "lightning"], 4, 4),
        (
            [
                "--sample-solver",
                "euler",
                "--sample-steps",
                "4",
                "--sample-shift",
                "5",
                "--sample-guide-scale",
                "1",
            ],
            4,
            4,
        ),
    ],
    ids=["dense-preset", "distilled", "explicit-recipe"],
)
def test_plan_json_counts(argv, forwards, dense, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--task", "t2v-A14B", "--magcache-plan", "--json", "--use-magcache", *argv])
    assert info.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["forwards"], data["dense_forwards"]) == (forwards, dense)
    assert {c["branch"] for c in data["calls"]} == ({"cond"} if dense == 4 else {"cond", "uncond"})
    assert data["cfg_free_experts"] == (["high", "low"] if dense == 4 else [])


def test_residual_cache_follows_a_cfg_free_plan(experts):
    cache = ResidualCache(lightning_plan())
    run(experts, (1.0, 1.0), cache=cache)
    assert cache.report() == {
        "high": {"cond": {"computed": 2, "skipped": 0}},
        "low": {"cond": {"computed": 2, "skipped": 0}},
    }


def test_calibration_of_a_cfg_free_run(experts):
    recorder = CalibrationRecorder()
    run(experts, (3.0, 1.0), cache=recorder)  # high CFG-free, low with CFG
    data = recorder.recording().to_json(
        {
            "task": "t2v-A14B",
            "shift": 5.0,
            "size": "832*480",
            "solver": "euler",
            "dtype": "float32",
            "prompts": ["x"],
        }
    )
    ratios = data["mag_ratios"]
    assert len(ratios) == 6 and data["uncond_from_cond"] == [
        1,
        2,
    ]  # steps 1 (high) and 2 (first uncond: no previous)
    assert ratios[0] == ratios[1] and ratios[2] == ratios[3] and ratios[4] != ratios[5]
