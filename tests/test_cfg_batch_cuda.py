"""CFG as one batch-2 forward on CUDA (marker `cuda`; skipped without CUDA):

- at real A14B width (one block, bf16): the batched forward agrees with the two separate forwards within
  the tolerance `test_cuda.py` uses for bf16 paths that only reorder work (chunked vs unchunked): max abs
  difference <= 1% of max |output|;
- a batched sampling run with MagCache never synchronises with the host, and its latents agree with the
  unbatched run's.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda import DEVICE, _tiny_cuda_model, inputs, random_model, real_width_config

from magcache_generate.magcache.plan import Plan, PlannedCall
from magcache_generate.magcache.policy import MagCacheConfig
from magcache_generate.magcache.residual_cache import ResidualCache
from magcache_generate.magcache.session import TimedCache
from wan.cfg_batch import repeat_batch, split_branches, stack_contexts
from wan.sampling import sample
from wan.schedule import make_schedule
from wan.testing.models import StaticModels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def relative_max(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def test_batched_forward_matches_two_forwards_at_real_width():
    cfg = real_width_config(layers=1)
    model = random_model(cfg).to(torch.bfloat16)
    x, t, ctx = inputs(cfg)
    ctx, ctx_null = ctx.bfloat16(), torch.randn_like(ctx).bfloat16()[:, :40]  # another prompt length
    with torch.inference_mode():
        cond, uncond = model(x, t, ctx), model(x, t, ctx_null)
        out = model(repeat_batch(x, 2), repeat_batch(t, 2), stack_contexts([ctx, ctx_null]))
    b_cond, b_uncond = split_branches(out, 2)
    errors = relative_max(b_cond, cond), relative_max(b_uncond, uncond)
    print(f"batched vs separate, max abs / max |ref|: cond {errors[0]:.2e}, uncond {errors[1]:.2e}")
    assert max(errors) <= 1e-2


def test_batched_sampling_with_magcache_never_synchronises():
    model = _tiny_cuda_model("t2v")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    noise = torch.randn(1, 16, 3, 8, 12, device=DEVICE, generator=g)
    ctx = torch.randn(1, 20, 64, device=DEVICE, generator=g, dtype=torch.bfloat16)
    ctx_null = torch.randn(1, 12, 64, device=DEVICE, generator=g, dtype=torch.bfloat16)
    pattern = {"cond": "CsCsC", "uncond": "CsCCs"}  # steps 3 and 4 differ: separate calls there
    calls = tuple(
        PlannedCall(s, b, "single", pattern[b][s] == "C", False, 1.0) for s in range(5) for b in pattern
    )
    plan = Plan("ti2v-5B", "aligned", 5, MagCacheConfig(), "toy", calls)
    schedule = make_schedule("unipc", 5, 5.0)
    models = StaticModels({"single": model})

    def run(cfg_batch: bool) -> tuple[torch.Tensor, TimedCache]:
        cache = TimedCache(ResidualCache(plan))
        out = sample(
            noise,
            schedule,
            models,
            ctx,
            ctx_null,
            guide_scale=(5.0, 5.0),
            boundary=None,
            cache=cache,
            cfg_batch=cfg_batch,
        )
        return out, cache

    run(True)  # warm-up: the cached RoPE table, kernels for both batch sizes
    run(False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batched, batched_cache = run(True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    plain, plain_cache = run(False)
    assert batched_cache.inner.report() == plain_cache.inner.report()
    assert len(batched_cache.block_seconds()) == len(plain_cache.block_seconds())
    print(f"batched vs separate sampling, max abs / max |ref|: {relative_max(batched, plain):.2e}")
    assert relative_max(batched, plain) <= 2e-2
