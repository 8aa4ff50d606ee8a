"""CFG as one batch-2 forward (`sample(..., cfg_batch=True)`): the same math as two forwards, and the step
caches (NoCache, ResidualCache, TimedCache, CalibrationRecorder) report exactly what separate calls report.

Measured here (CPU, float32, tiny random DiTs): one batched forward differs from the two separate ones by
at most ~2e-6 (outputs of magnitude ~5); a 6-step sampling run by at most ~3e-6. Not bit-exact: the GEMMs
block their rows differently when there are twice as many.
"""

from __future__ import annotations

import pytest
import torch

from magcache_generate.magcache.calibration import CalibrationRecorder
from magcache_generate.magcache.plan import Plan, PlannedCall
from magcache_generate.magcache.policy import MagCacheConfig
from magcache_generate.magcache.residual_cache import NoCache, ResidualCache, ResidualCacheError
from magcache_generate.magcache.session import TimedCache
from wan.cfg_batch import repeat_batch, split_branches, stack_contexts
from wan.conditioning import Conditioning
from wan.modules.transformer import TokenTimesteps, WanTransformer
from wan.sampling import sample
from wan.schedule import make_schedule
from wan.testing.dit import random_transformer_state_dict, tiny_transformer_config
from wan.testing.models import StaticModels
from wan.testing.stream_log import StreamLog

# Float rounding of a batch-2 GEMM against two batch-1 GEMMs (observed <= 3e-6 on outputs of ~5)
TOLERANCE = {"rtol": 1e-5, "atol": 2e-5}
BOUNDARY = {"t2v": 0.875, "i2v": 0.9, "ti2v": None}


def tiny_model(model_type: str, seed: int, **sizes) -> WanTransformer:
    cfg = tiny_transformer_config(model_type, **sizes)
    model = WanTransformer(cfg)
    model.load_state_dict(random_transformer_state_dict(cfg, seed))
    return model.eval()


class Counting(torch.nn.Module):
    """Wraps a transformer; records the batch size of every call."""

    def __init__(self, inner: WanTransformer, log: list[tuple[str, int]], name: str):
        super().__init__()
        self.inner, self.log, self.name = inner, log, name

    def forward(self, x, t, context, y=None, *, cache=None):
        self.log.append((self.name, x.shape[0]))
        return self.inner(x, t, context, y, cache=cache)


def task_setup(model_type: str, seed: int = 0):
    """(models, noise, context, context_null, conditioning) of a tiny run of `model_type`."""
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_transformer_config(model_type)
    noise = torch.randn(1, cfg.out_dim, 3, 8, 8, generator=g)
    context = torch.randn(1, 5, cfg.text_dim, generator=g)
    context_null = torch.randn(1, 9, cfg.text_dim, generator=g)  # another length: padded in the batch
    if model_type == "ti2v":  # with an image: the first latent frame imposed, per-token timesteps
        conditioning = Conditioning(first_frame=torch.randn(1, cfg.out_dim, 1, 8, 8, generator=g))
        models = {"single": tiny_model(model_type, 1)}
    else:
        y = torch.randn(1, 20, 3, 8, 8, generator=g) if model_type == "i2v" else None
        conditioning = Conditioning(y=y)
        models = {"high": tiny_model(model_type, 1), "low": tiny_model(model_type, 2)}
    return models, noise, context, context_null, conditioning


def run_loop(model_type, *, cfg_batch, guide_scale=(3.0, 4.0), cache=None, steps=6, solver="unipc"):
    models, noise, context, context_null, conditioning = task_setup(model_type)
    log: list[tuple[str, int]] = []
    counted = {e: Counting(m, log, e) for e, m in models.items()}
    infos = []
    out = sample(
        noise,
        make_schedule(solver, steps, 5.0),
        StaticModels(counted),
        context,
        context_null,
        guide_scale=guide_scale,
        boundary=BOUNDARY[model_type],
        conditioning=conditioning,
        cache=cache,
        on_step=infos.append,
        cfg_batch=cfg_batch,
    )
    return out, log, infos


# ------------------------------------------------------------------------------------- one forward


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
def test_one_batched_forward_equals_two_forwards(model_type):
    model = tiny_model(model_type, 3, dim=64, num_heads=4, num_layers=3, ffn_dim=128)
    cfg = model.config
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16 if model_type == "i2v" else cfg.in_dim, 3, 8, 8, generator=g)
    y = torch.randn(1, 20, 3, 8, 8, generator=g) if model_type == "i2v" else None
    cond, uncond = torch.randn(1, 5, cfg.text_dim, generator=g), torch.randn(1, 11, cfg.text_dim, generator=g)
    if model_type == "ti2v":  # per-token timesteps: frame-0 tokens at 0
        t = Conditioning(first_frame=x[:, :, :1]).model_timestep(700, x)
        t2 = TokenTimesteps(repeat_batch(t.values, 2), repeat_batch(t.index, 2))
    else:
        t = torch.tensor([700])
        t2 = repeat_batch(t, 2)
    with torch.inference_mode():
        separate = (model(x, t, cond, y), model(x, t, uncond, y))
        stacked = model(
            repeat_batch(x, 2), t2, stack_contexts([cond, uncond]), None if y is None else repeat_batch(y, 2)
        )
    batched = split_branches(stacked, 2)
    for got, want in zip(batched, separate, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)
    assert not torch.equal(batched[0], batched[1])  # the two halves really are the two branches


def test_split_branches_refuses_an_odd_batch():
    with pytest.raises(ValueError, match="does not split into 2 branches"):
        split_branches(torch.zeros(3, 4), 2)


# ------------------------------------------------------------------------------------ the loop


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
def test_batched_loop_equals_the_unbatched_loop(model_type):
    plain, plain_log, plain_infos = run_loop(model_type, cfg_batch=False)
    batched, batched_log, batched_infos = run_loop(model_type, cfg_batch=True)
    torch.testing.assert_close(batched, plain, **TOLERANCE)
    assert [batch for _, batch in plain_log] == [1] * 12
    assert [batch for _, batch in batched_log] == [2] * 6  # one forward per step instead of two
    assert [e for e, _ in batched_log] == [e for e, _ in plain_log[::2]]  # same expert per step
    assert all(i.batched for i in batched_infos) and not any(i.batched for i in plain_infos)
    assert [i.branches for i in batched_infos] == [i.branches for i in plain_infos]


def test_cfg_free_steps_are_unaffected():
    """(low 3.0, high 1.0): high-noise steps run cond only (batch 1), low-noise steps are batched."""
    plain, plain_log, _ = run_loop("t2v", cfg_batch=False, guide_scale=(3.0, 1.0), solver="euler", steps=4)
    batched, log, infos = run_loop("t2v", cfg_batch=True, guide_scale=(3.0, 1.0), solver="euler", steps=4)
    torch.testing.assert_close(batched, plain, **TOLERANCE)
    assert log == [("high", 1), ("high", 1), ("low", 2), ("low", 2)]
    assert plain_log == [("high", 1), ("high", 1), ("low", 1), ("low", 1), ("low", 1), ("low", 1)]
    assert [i.batched for i in infos] == [False, False, True, True]
    all_free, free_log, _ = run_loop("t2v", cfg_batch=True, guide_scale=(1.0, 1.0), solver="euler", steps=4)
    assert free_log == [("high", 1), ("high", 1), ("low", 1), ("low", 1)]
    torch.testing.assert_close(
        all_free,
        run_loop("t2v", cfg_batch=False, guide_scale=(1.0, 1.0), solver="euler", steps=4)[0],
        rtol=0,
        atol=0,
    )


# ------------------------------------------------------------------------------------ MagCache


def toy_plan(pattern: dict[str, str], experts: str) -> Plan:
    """pattern: branch -> 'C'/'s' per step; experts: 'H'/'L'/'S' per step (aligned mode)."""
    names = {"H": "high", "L": "low", "S": "single"}
    calls = tuple(
        PlannedCall(s, b, names[experts[s]], pattern[b][s] == "C", False, 1.0)
        for s in range(len(experts))
        for b in pattern
    )
    return Plan("t2v-A14B", "aligned", len(experts), MagCacheConfig(), "toy", calls)


AGREEING = {"cond": "CsCCsC", "uncond": "CsCCsC"}
DIFFERING = {"cond": "CsCCsC", "uncond": "CCsCss"}  # steps 1, 2 and 5 differ


@pytest.mark.parametrize(
    ("pattern", "batched_steps"), [(AGREEING, 6), (DIFFERING, 3)], ids=["agree", "differ"]
)
def test_magcache_batched_steps_report_exactly_as_separate_calls(pattern, batched_steps):
    experts = "HHHLLL"  # t2v with boundary 0.875 over 6 UniPC steps at shift 5
    caches = {flag: TimedCache(ResidualCache(toy_plan(pattern, experts))) for flag in (False, True)}
    plain, plain_log, _ = run_loop("t2v", cfg_batch=False, cache=caches[False])
    assert len(plain_log) == 12
    batched, log, infos = run_loop("t2v", cfg_batch=True, cache=caches[True])
    assert [i.expert for i in infos] == ["high"] * 3 + ["low"] * 3
    torch.testing.assert_close(batched, plain, **TOLERANCE)
    plain_cache, batched_cache = caches[False].inner, caches[True].inner
    assert batched_cache.report() == plain_cache.report()
    assert batched_cache._done == plain_cache._done  # computed/skipped per (step, branch)
    # one call of batch 2 where the plan decides alike, two of batch 1 where it differs
    assert sum(i.batched for i in infos) == batched_steps
    assert len(log) == 12 - batched_steps
    assert sorted(batch for _, batch in log) == [1] * (12 - 2 * batched_steps) + [2] * batched_steps
    # per-call block-stack timings: as many as computed calls, batched or not
    computed = sum(c["computed"] for b in plain_cache.report().values() for c in b.values())
    assert len(caches[True].block_seconds()) == len(caches[False].block_seconds()) == computed


def test_residual_cache_batched_call_on_a_toy():
    """Compute both halves as one stack, then skip both: each half gets its own branch's residual."""
    cache = ResidualCache(toy_plan({"cond": "Cs", "uncond": "Cs"}, "SS"))
    assert cache.batchable(0, ("cond", "uncond"), "single")
    cache.begin_batched_call(0, ("cond", "uncond"), "single")
    h = torch.cat([torch.full((1, 3, 2), 1.0), torch.full((1, 3, 2), 10.0)])
    assert torch.equal(cache.run(h, lambda v: 2 * v), 2 * h)  # residuals: 1 (cond), 10 (uncond)
    cache.begin_batched_call(1, ("cond", "uncond"), "single")
    out = cache.run(torch.full((2, 3, 2), 5.0), lambda v: pytest.fail("a skipped step runs no blocks"))
    assert torch.equal(out[0], torch.full((3, 2), 6.0)) and torch.equal(out[1], torch.full((3, 2), 15.0))
    assert cache.report() == {
        "single": {"cond": {"computed": 1, "skipped": 1}, "uncond": {"computed": 1, "skipped": 1}}
    }


def test_residual_cache_refuses_a_batch_the_plan_splits():
    cache = ResidualCache(toy_plan({"cond": "CC", "uncond": "Cs"}, "SS"))
    assert cache.batchable(0, ("cond", "uncond"), "single")
    assert not cache.batchable(1, ("cond", "uncond"), "single")
    assert not cache.batchable(2, ("cond", "uncond"), "single")  # not in the plan: separate calls say so
    with pytest.raises(ResidualCacheError, match="computes some branches of step 1 and skips others"):
        cache.begin_batched_call(1, ("cond", "uncond"), "single")
    cache.begin_batched_call(0, ("cond", "uncond"), "single")
    with pytest.raises(ResidualCacheError, match="batch 3"):
        cache.run(torch.ones(3, 2, 2), lambda v: v)
    with pytest.raises(ResidualCacheError, match="expects the single expert"):
        cache.begin_batched_call(0, ("cond", "uncond"), "high")


def test_no_cache_batches_everything():
    cache = NoCache()
    assert cache.batchable(3, ("cond", "uncond"), "low")
    cache.begin_batched_call(3, ("cond", "uncond"), "low")
    assert torch.equal(cache.run(torch.ones(2, 1), lambda v: v + 1), torch.full((2, 1), 2.0))


def test_timed_cache_shares_a_batched_stack_between_its_calls():
    cache = TimedCache(NoCache())
    cache.begin_batched_call(0, ("cond", "uncond"), "single")
    cache.run(torch.ones(2, 4), lambda v: v)
    cache.begin_call(1, "cond", "single")
    cache.run(torch.ones(1, 4), lambda v: v)
    seconds = cache.block_seconds()
    assert len(seconds) == 3 and seconds[0] == seconds[1]


# ------------------------------------------------------------------------------------ calibration


def test_calibration_records_batched_halves_per_branch():
    """A dense calibration run batched records the same samples (layout and values within rounding)."""
    recorders = {flag: CalibrationRecorder() for flag in (False, True)}
    for flag, recorder in recorders.items():
        run_loop("t2v", cfg_batch=flag, cache=recorder)
    plain, batched = (recorders[f].recording() for f in (False, True))
    assert batched.experts == plain.experts
    assert [(s.step, s.branch, s.expert) for s in batched.samples] == [
        (s.step, s.branch, s.expert) for s in plain.samples
    ]
    assert len(plain.samples) == 10  # steps 1..5, both branches
    for a, b in zip(batched.samples, plain.samples, strict=True):
        assert (a.gamma, a.std, a.cos_dis) == pytest.approx((b.gamma, b.std, b.cos_dis), rel=1e-4, abs=1e-6)


def test_calibration_batched_call_on_a_toy():
    """Two halves of a batched call are recorded exactly as two separate calls."""
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    separate, stacked = CalibrationRecorder(), CalibrationRecorder()
    for step, h in enumerate(hs):
        for k, branch in enumerate(("cond", "uncond")):
            separate.begin_call(step, branch, "single")
            separate.run(h[k : k + 1], torch.tanh)
        assert stacked.batchable(step, ("cond", "uncond"), "single")
        stacked.begin_batched_call(step, ("cond", "uncond"), "single")
        stacked.run(h, torch.tanh)
    assert stacked.recording() == separate.recording()


# ------------------------------------------------------------------------------------ streamed blocks


def test_streamed_blocks_are_copied_once_per_batched_step(tmp_path):
    """CPU fake split: a batched CFG step copies each streamed block once (two forwards: twice), and the
    streamed batched run equals the resident batched run bit for bit."""
    import wan
    from wan.placement import Placement, streamed_source
    from wan.testing.dit import write_transformer_folder

    cfg = tiny_transformer_config("t2v", num_layers=5)
    folder = write_transformer_folder(tmp_path / "m", cfg, seed=7)

    def load(resident):
        placement = Placement(torch.device("cpu"), resident_blocks=resident, pin=False, log=StreamLog())
        return wan.load_transformer(folder, placement=placement)

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, 2, 8, 8, generator=g)
    context, context_null = (
        torch.randn(1, 5, cfg.text_dim, generator=g),
        torch.randn(1, 3, cfg.text_dim, generator=g),
    )
    outs, copies = {}, {}
    for name, resident, batched in (("resident", None, True), ("two", 2, False), ("batched", 2, True)):
        model = load(resident)
        source = streamed_source(model)
        before = len(source.log.copies) if source is not None else 0
        outs[name] = sample(
            noise,
            make_schedule("unipc", 4, 5.0),
            StaticModels({"single": model}),
            context,
            context_null,
            guide_scale=(4.0, 4.0),
            boundary=None,
            cfg_batch=batched,
        )
        copies[name] = len(source.log.copies) - before if source is not None else 0
    assert torch.equal(outs["batched"], outs["resident"])
    torch.testing.assert_close(outs["batched"], outs["two"], **TOLERANCE)
    # 3 streamed blocks: each forward copies 3 (the last one's prefetch of the next call included)
    assert copies == {"resident": 0, "two": 8 * 3, "batched": 4 * 3}
