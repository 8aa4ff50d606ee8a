"""The attention policy: backend choice, what it reports, refusals, layouts (CPU; CUDA kernels in test_cuda)."""

import math
import sys

import pytest
import torch

from wan.attention_backends import BACKENDS, backend_installed, backend_problem
from wan.modules.attention import AttentionBackendError, AttentionPolicy


def reference_attention(q, k, v):
    """Softmax attention in float64, [B, L, H, D] in and out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2)


def qkv(b=1, lq=24, lk=24, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # [B, L, H, D] views of [B, L, H*D] projections, as the block makes them
    q = torch.randn(b, lq, heads * dim, generator=g).unflatten(-1, (heads, dim))
    k = torch.randn(b, lk, heads * dim, generator=g).unflatten(-1, (heads, dim))
    v = torch.randn(b, lk, heads * dim, generator=g).unflatten(-1, (heads, dim))
    return q, k, v


@pytest.mark.parametrize("backend", ["auto", "flash", "math"])
def test_cpu_backends_are_exact_attention_and_report_what_ran(backend):
    policy = AttentionPolicy(backend)
    q, k, v = qkv()
    out = policy(q, k, v, "self")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
    qc, kc, vc = qkv(lq=24, lk=7, seed=1)
    assert torch.allclose(policy(qc, kc, vc, "cross").double(), reference_attention(qc, kc, vc), atol=1e-5)
    expected = {"auto": "sdpa-flash/cpu", "flash": "sdpa-flash/cpu", "math": "sdpa-math/cpu"}[backend]
    assert policy.used == {"self": expected, "cross": expected}
    assert policy.describe() == expected
    assert policy.report() == {"requested": backend, "actual": expected, "by_site": policy.used}


def test_fused_output_comes_back_in_the_query_layout():
    """SDPA's fused kernels return the query's memory layout: [B, L, H, D] contiguous, so the block's
    flatten to [B, L, dim] is a view, not a copy."""
    q, k, v = qkv(lq=32, lk=32, heads=4)
    out = AttentionPolicy("flash")(q, k, v)
    assert out.is_contiguous()
    assert out.flatten(2).data_ptr() == out.data_ptr()


def test_describe_names_each_site_when_they_differ():
    policy = AttentionPolicy()
    policy.used = {"self": "sdpa-cudnn/cuda", "cross": "sdpa-flash/cuda"}
    assert policy.describe() == "cross: sdpa-flash/cuda, self: sdpa-cudnn/cuda"
    assert AttentionPolicy().describe() == "none"


def test_cuda_only_and_missing_backends_are_refused():
    assert backend_problem("cudnn", "cpu") == "runs only on CUDA, not on cpu"
    assert backend_problem("efficient", "cpu") is not None
    assert backend_problem("cudnn", None) is None and backend_problem("cudnn", "cuda") is None
    assert backend_problem("math", "cpu") is None and backend_problem("flash", "cpu") is None
    assert "not an attention backend" in backend_problem("sage", "cuda")
    with pytest.raises(AttentionBackendError, match="runs only on CUDA"):
        AttentionPolicy("cudnn").check_device(torch.device("cpu"))
    with pytest.raises(AttentionBackendError, match="not an attention backend"):
        AttentionPolicy("sage")
    for name in ("fa3", "fa2"):
        if not backend_installed(name):
            assert "which is not installed" in backend_problem(name, "cuda")
            with pytest.raises(AttentionBackendError, match="not installed"):
                AttentionPolicy(name)


def test_every_backend_is_known_to_the_policy():
    assert set(BACKENDS) == {"auto", "cudnn", "flash", "efficient", "math", "fa3", "fa2"}
    for name in BACKENDS:
        if backend_installed(name):
            assert AttentionPolicy(name).requested == name


def test_attention_runs_eagerly_inside_a_compiled_function():
    """torch.compile leaves the attention call to the policy (a graph break), so it still records."""
    policy = AttentionPolicy("math")
    q, k, v = qkv()

    @torch.compile(backend="eager", fullgraph=False)
    def f(q, k, v):
        return policy(q * 1.0, k, v, "self") + 0.0

    out = f(q, k, v)
    assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
    assert policy.used == {"self": "sdpa-math/cpu"}


FAKE_FA3 = """
import torch


def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2), None  # some FA3 releases return (out, softmax_lse)
"""


@pytest.fixture
def package_dir(tmp_path, monkeypatch):
    """A folder on sys.path for a stand-in `flash_attn_interface`, imported fresh by each test."""
    sys.modules.pop("flash_attn_interface", None)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("flash_attn_interface", None)


def test_package_backend_is_called_in_its_layout_and_reported(package_dir):
    """A stand-in `flash_attn_interface` (the real one needs a Hopper GPU): [B, L, H, D] in and out."""
    (package_dir / "flash_attn_interface.py").write_text(FAKE_FA3)
    policy = AttentionPolicy("fa3")
    q, k, v = qkv()
    out = policy(q, k, v, "self")
    assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
    assert policy.report()["actual"] == "fa3/cpu"


def test_broken_package_backend_fails_before_loading(package_dir):
    (package_dir / "flash_attn_interface.py").write_text("raise ImportError('built for another torch')\n")
    with pytest.raises(AttentionBackendError, match="does not import"):
        AttentionPolicy("fa3").check_device(torch.device("cuda"))
    assert not AttentionPolicy("auto")._imports("fa3")  # auto falls back to SDPA
