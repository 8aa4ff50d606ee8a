import pytest
import torch

from wan.modules.transformer import TokenTimesteps, WanTransformer
from wan.testing.dit import random_transformer_state_dict, tiny_transformer_config


def make(model_type="t2v", **kw):
    cfg = tiny_transformer_config(model_type, **kw)
    model = WanTransformer(cfg)
    model.load_state_dict(random_transformer_state_dict(cfg, seed=1))
    return model.eval()


def inputs(model, b=1, f=2, h=4, w=6, ctx_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x_ch = 16 if cfg.model_type == "i2v" else cfg.in_dim
    x = torch.randn(b, x_ch, f, h, w, generator=g)
    ctx = torch.randn(b, ctx_len, cfg.text_dim, generator=g)
    y = torch.randn(b, 20, f, h, w, generator=g) if cfg.model_type == "i2v" else None
    return x, ctx, y


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
def test_output_shape_and_dtype(model_type):
    model = make(model_type)
    x, ctx, y = inputs(model)
    with torch.no_grad():
        out = model(x, torch.tensor([900]), ctx, y)
    assert out.shape == (1, model.config.out_dim, *x.shape[2:])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_uniform_per_token_timesteps_equal_scalar():
    model = make("ti2v")
    x, ctx, _ = inputs(model)
    n = x.shape[2] * x.shape[3] * x.shape[4] // 4
    with torch.no_grad():
        a = model(x, torch.tensor([731.0]), ctx)
        b = model(x, TokenTimesteps.from_dense(torch.full((1, n), 731.0)), ctx)
        c = model(x, TokenTimesteps(torch.tensor([[731.0]]), torch.zeros(1, n, dtype=torch.int64)), ctx)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_official_dense_per_token_timesteps_are_accepted():
    """Upstream's ti2v call: t [B, L], one timestep per patch token (frame 0 at 0). Converted once per
    call to TokenTimesteps (the form the sampling loop passes), same output."""
    model = make("ti2v")
    x, ctx, _ = inputs(model, b=2)
    n = x.shape[2] * x.shape[3] * x.shape[4] // 4
    dense = torch.full((2, n), 731.0)
    dense[:, : n // 3] = 0.0
    dense[1, n // 3 :] = 500.0
    with torch.no_grad():
        official = model(x, dense, ctx)
        compact = model(x, TokenTimesteps.from_dense(dense), ctx)
        one_by_one = [model(x[i : i + 1], dense[i : i + 1], [ctx[i]]) for i in range(2)]
    assert torch.equal(official, compact)
    for i, single in enumerate(one_by_one):
        assert (official[i : i + 1] - single).abs().max() <= 1e-5 * (1 + single.abs().max())


def test_timesteps_of_the_wrong_shape_are_refused():
    model = make("ti2v")
    x, ctx, _ = inputs(model)
    n = x.shape[2] * x.shape[3] * x.shape[4] // 4
    with pytest.raises(ValueError, match=rf"\[B\], per-token \[B, {n}\]"):
        model(x, torch.full((1, n + 1), 731.0), ctx)
    with pytest.raises(ValueError, match="expected 12"):
        model(x, TokenTimesteps(torch.tensor([[1.0]]), torch.zeros(1, n + 1, dtype=torch.int64)), ctx)


def test_per_token_timesteps_match_unbatched_embedding():
    """The per-distinct-value time embedding equals a per-token computation."""
    model = make("ti2v")
    x, _, _ = inputs(model)
    n = x.shape[2] * x.shape[3] * x.shape[4] // 4
    t = torch.full((1, n), 800.0)
    t[0, : n // 2] = 0.0
    mod = model.embed_time(TokenTimesteps.from_dense(t), n)
    per_token = model.embed_time(t.reshape(-1), 1)  # one sample per token: uniform path
    assert torch.allclose(mod.per_token(mod.e)[0], per_token.e[:, 0], atol=1e-6)


def test_batch_equals_single_samples():
    model = make("t2v")
    x, ctx, _ = inputs(model, b=2)
    t = torch.tensor([999, 412])
    with torch.no_grad():
        both = model(x, t, ctx)
        one = model(x[1:], t[1:], ctx[1:])
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_context_is_zero_padded_to_text_len():
    model = make("t2v")
    x, ctx, _ = inputs(model)
    padded = torch.cat([ctx, torch.zeros(1, model.config.text_len - ctx.shape[1], ctx.shape[2])], dim=1)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([500]), ctx), model(x, torch.tensor([500]), padded))
        assert torch.equal(model(x, torch.tensor([500]), ctx), model(x, torch.tensor([500]), [ctx[0]]))


def test_errors_are_clear():
    model = make("i2v")
    x, ctx, y = inputs(model)
    with pytest.raises(ValueError, match="channels"):
        model(x, torch.tensor([1]), ctx)  # i2v without y
    too_long = torch.zeros(1, model.config.text_len + 1, model.config.text_dim)
    with pytest.raises(ValueError, match="text_len"):
        model(x, torch.tensor([1]), too_long, y)


def test_bf16_parameters_keep_float32_residual_and_head():
    model = make("t2v")
    x, ctx, _ = inputs(model)
    with torch.no_grad():
        ref = model(x, torch.tensor([600]), ctx)
        model16 = model.to(torch.bfloat16)
        out = model16(x, torch.tensor([600]), ctx)
    assert out.dtype == torch.float32
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 0.05, rel


class DoubleCache:
    """A cache that records what it sees and computes normally."""

    def __init__(self):
        self.calls = 0

    def run(self, h, blocks):
        self.calls += 1
        return blocks(h)


def test_cache_hook_wraps_the_block_stack():
    model = make("t2v")
    x, ctx, _ = inputs(model)
    cache = DoubleCache()
    with torch.no_grad():
        a = model(x, torch.tensor([600]), ctx)
        b = model(x, torch.tensor([600]), ctx, cache=cache)
    assert cache.calls == 1 and torch.equal(a, b)


def test_fp32_parameters_under_bf16_autocast_follow_upstream_regime():
    """Upstream's default GPU regime: fp32 weights under bf16 autocast; the time MLPs and the head
    stay float32 (autocast disabled inside), so the result is close to the fp32 one."""
    model = make("t2v")
    x, ctx, _ = inputs(model)
    with torch.no_grad():
        ref = model(x, torch.tensor([700]), ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, torch.tensor([700]), ctx)
            mod = model.embed_time(torch.tensor([700]), 12)
    assert out.dtype == torch.float32 and mod.e.dtype == torch.float32 and mod.e0.dtype == torch.float32
    assert (out - ref).abs().max() / ref.abs().max() < 0.05
