"""GPU regime checks (marker `cuda`; skipped without CUDA): run them on a GPU machine with
`python -m pytest -q -m cuda tests/test_cuda.py`.

- bf16 transformer at real A14B width (2 blocks) against the float32 reference with the same weights;
- every attention backend available against math attention, and `auto` never falling back to math
  for the layout the model passes;
- the same inputs twice give identical outputs (model and CLI frames);
- a sampling step under `torch.cuda.set_sync_debug_mode("error")`: no host synchronisation at all;
- token chunks and --compile agree with the plain forward.

Tolerances (stated, not fitted on a GPU run yet): bf16 vs float32 output, relative RMS error <= 3% and
max abs error <= 10% of max |reference| (bf16 keeps 8 bits of mantissa; two real-width blocks of bf16
matmuls give errors of order 1%); fused attention vs math: max abs <= 2% of max |reference| + 2e-3.
"""

from __future__ import annotations

import math

import pytest
import torch

from wan.attention_backends import BACKENDS, backend_problem
from wan.conditioning import Conditioning
from wan.modules.attention import AttentionPolicy
from wan.modules.compile import BlockCompiler
from wan.modules.transformer import TransformerConfig, WanTransformer
from wan.sampling import sample
from wan.schedule import make_schedule
from wan.testing.models import StaticModels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"


def real_width_config(layers: int = 2, model_type: str = "t2v") -> TransformerConfig:
    channels = 48 if model_type == "ti2v" else 16
    return TransformerConfig(
        model_type=model_type,
        in_dim=channels,
        out_dim=channels,
        dim=5120,
        ffn_dim=13824,
        num_heads=40,
        num_layers=layers,
    )


def random_model(cfg: TransformerConfig, seed: int = 0) -> WanTransformer:
    """Random weights (std 0.02, modulation 0.1) that are exactly representable in bf16."""
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = WanTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.1 if name.endswith("modulation") else 0.02)
            p.copy_(p.bfloat16().float())
    return model.eval().requires_grad_(False)


def inputs(cfg: TransformerConfig, latent=(5, 30, 52), seed: int = 1):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, *latent, device=DEVICE, generator=g)
    ctx = torch.randn(1, 77, cfg.text_dim, device=DEVICE, generator=g)
    return x, torch.tensor([900], device=DEVICE), ctx


def test_bf16_forward_matches_float32_reference_at_real_width():
    cfg = real_width_config()
    model = random_model(cfg)
    x, t, ctx = inputs(cfg)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        model.attention = AttentionPolicy("math")
        ref = model(x, t, ctx).double()
        model.to(torch.bfloat16)
        model.attention = AttentionPolicy("auto")
        out = model(x, t, ctx.bfloat16()).double()
    assert out.dtype == ref.dtype and torch.isfinite(out).all()
    rel_rms = ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    rel_max = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"bf16 vs fp32: relative RMS {rel_rms:.4f}, max abs / max |ref| {rel_max:.4f}")
    assert rel_rms <= 0.03 and rel_max <= 0.10


def _attention_inputs(tokens: int = 4096, heads: int = 40, dim: int = 128):
    g = torch.Generator(device=DEVICE).manual_seed(2)
    shape = (1, tokens, heads * dim)  # [B, L, dim] projections viewed as heads, as the model does
    q, k, v = (
        torch.randn(shape, device=DEVICE, generator=g).bfloat16().unflatten(-1, (heads, dim)) for _ in "qkv"
    )
    return q, k, v


def _math_reference(q, k, v):
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ vd).transpose(1, 2)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "math"])
def test_each_attention_backend_agrees_with_math_attention(backend):
    if backend_problem(backend, "cuda") is not None:
        pytest.skip(f"{backend}: {backend_problem(backend, 'cuda')}")
    q, k, v = _attention_inputs()
    policy = AttentionPolicy(backend)
    with torch.inference_mode():
        out = policy(q, k, v, "self")
        cross = policy(q, k[:, :512], v[:, :512], "cross")
    for got, ref in ((out, _math_reference(q, k, v)), (cross, _math_reference(q, k[:, :512], v[:, :512]))):
        err = (got.double() - ref).abs().max().item()
        assert err <= 0.02 * ref.abs().max().item() + 2e-3, (backend, err)
    if backend in ("cudnn", "flash", "efficient"):
        assert policy.used["self"] == f"sdpa-{backend}/cuda"  # forced: no silent fallback
    print(backend, policy.report())


def test_auto_attention_uses_a_fused_kernel_for_the_model_layout():
    """No mask, bf16, [B, L, heads, 128] seen through a transpose: SDPA must not fall back to math."""
    q, k, v = _attention_inputs()
    policy = AttentionPolicy("auto")
    with torch.inference_mode():
        policy(q, k, v, "self")
        policy(q, k[:, :512], v[:, :512], "cross")
    print(policy.report())
    assert all("math" not in label for label in policy.used.values()), policy.used


def test_same_inputs_twice_give_identical_output():
    cfg = real_width_config(layers=1)
    model = random_model(cfg).to(torch.bfloat16)
    x, t, ctx = inputs(cfg)
    with torch.inference_mode():
        a = model(x, t, ctx.bfloat16())
        b = model(x, t, ctx.bfloat16())
    assert torch.equal(a, b)


def test_chunked_forward_is_close_to_unchunked():
    cfg = real_width_config(layers=1)
    model = random_model(cfg).to(torch.bfloat16)
    x, t, ctx = inputs(cfg)
    with torch.inference_mode():
        ref = model(x, t, ctx.bfloat16())
        model.activation_chunk = 1024
        out = model(x, t, ctx.bfloat16())
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-2


def _tiny_cuda_model(model_type: str) -> WanTransformer:
    channels = 48 if model_type == "ti2v" else 16
    cfg = TransformerConfig(model_type, channels, channels, 256, 512, 2, 2, text_len=32, text_dim=64)
    return random_model(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("model_type", ["t2v", "ti2v"])
def test_a_sampling_run_never_synchronises_with_the_host(model_type):
    model = _tiny_cuda_model(model_type)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    noise = torch.randn(1, model.config.in_dim, 3, 8, 12, device=DEVICE, generator=g)
    ctx = torch.randn(1, 20, 64, device=DEVICE, generator=g, dtype=torch.bfloat16)
    first = torch.randn(1, 48, 1, 8, 12, device=DEVICE, generator=g)
    cond = Conditioning(first_frame=first) if model_type == "ti2v" else Conditioning()
    schedule = make_schedule("unipc", 4, 5.0)
    models = StaticModels({"single": model})
    kwargs = dict(guide_scale=(5.0, 5.0), boundary=None, conditioning=cond)
    sample(noise, schedule, models, ctx, ctx, **kwargs)  # warm-up: the cached RoPE table, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sample(noise, schedule, models, ctx, ctx, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_blocks_match_eager_on_cuda():
    torch._dynamo.reset()
    model = _tiny_cuda_model("t2v")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, device=DEVICE, generator=g)
    ctx = torch.randn(1, 20, 64, device=DEVICE, generator=g, dtype=torch.bfloat16)
    t = torch.tensor([700], device=DEVICE)
    with torch.inference_mode():
        ref = model(x, t, ctx)
        compiler = BlockCompiler()
        model.block_runner = compiler
        out = model(x, t, ctx)
        again = model(x, t, ctx)
    print(f"compile {compiler.compile_seconds:.1f} s for {compiler.signatures} signatures")
    assert torch.equal(out, again)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 2e-2


def test_cli_on_cuda_repeats_frames_exactly(tmp_path):
    from test_cli_run import frames, run_cli

    from wan.testing.checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "ti2v-5B", seed=3)
    argv = ["--task", "ti2v-5B", "--ckpt-dir", str(ckpt), "--size", "1280*704", "--frame-num", "5"]
    argv += ["--sample-steps", "3", "--base-seed", "11", "--device", DEVICE, "--convert-model-dtype"]
    runs = []
    for name in ("a", "b"):
        code = run_cli(
            [*argv, "--save-file", str(tmp_path / f"{name}.mp4"), "--save-frames", str(tmp_path / name)]
        )
        assert code == 0
        runs.append(frames(tmp_path / name))
    assert runs[0].shape[0] == 5 and (runs[0] == runs[1]).all()
