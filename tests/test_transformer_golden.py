"""Parity of the transformer with the official WanModel.forward (goldens `dit_*`, fp32).

Tolerance: max abs error <= 1e-5 * (1 + max |reference|); measured ~5e-7 relative on the dev set.
Per-token timesteps (ti2v) go in as upstream passes them: a dense [B, L] tensor.
`dit_t2v_batch_padded` holds two samples of different sizes in one upstream call (token padding to
seq_len). Our API takes one [B, C, F, H, W] tensor, so each sample runs alone with its own timestep
row; the golden notes state that upstream's padded output equals the unpadded single-sample run.
"""

import pytest
import torch
from goldens import entry, golden_params, indexed, tensors, weights_path

import wan
from wan.modules.rope import grid_rope
from wan.testing.reference import rope_table


def tokens(x: torch.Tensor) -> int:
    return x.shape[1] * x.shape[2] * x.shape[3] // 4


def timesteps(t: torch.Tensor, i: int, n: int) -> torch.Tensor:
    return t[i : i + 1, :n] if t.dim() == 2 else t[i : i + 1]


@pytest.mark.parametrize("name", golden_params("dit"))
def test_dit_matches_official(name):
    e = entry(name)
    model = wan.load_transformer(weights_path(e["weights"]))
    data = tensors(name)
    xs, contexts, ys = indexed(data, "input.x"), indexed(data, "input.context"), indexed(data, "input.y")
    refs = indexed(data, "output")
    assert xs and len(xs) == len(refs) == len(contexts)
    t = data["input.t"]
    for i, x in enumerate(xs):
        ti = timesteps(t, i, tokens(x))
        y = ys[i][None] if ys else None
        with torch.no_grad():
            out = model(x[None], ti, contexts[i][None], y)[0]
        ref = refs[i]
        assert out.dtype == torch.float32 and out.shape == ref.shape
        err = (out - ref).abs().max().item()
        assert err <= 1e-5 * (1 + ref.abs().max().item()), f"{name}[{i}]: max abs err {err}"


@pytest.mark.parametrize("name", golden_params("dit"))
def test_dit_rope_table_matches_official(name):
    data = tensors(name)
    ref = data["debug.rope_freqs_first24"]
    model = wan.load_transformer(weights_path(entry(name)["weights"]))
    ours = torch.view_as_real(rope_table(model.config.head_dim))[: ref.shape[0]]
    assert torch.equal(ours, ref)
    # The model's float32 table: token (p, p, p) of a grid holds the official row p, rounded to float32.
    n = ref.shape[0]
    table = grid_rope(model.config.head_dim, (n, n, n))
    diagonal = torch.arange(n) * (n * n + n + 1)
    assert torch.equal(table.cos[diagonal], ref[..., 0].float())
    assert torch.equal(table.sin[diagonal], ref[..., 1].float())


@pytest.mark.parametrize("name", golden_params("dit"))
def test_dit_time_and_text_embeddings(name):
    """The intermediate embeddings match too (localises a regression)."""
    e = entry(name)
    model = wan.load_transformer(weights_path(e["weights"]))
    data = tensors(name)
    xs, contexts = indexed(data, "input.x"), indexed(data, "input.context")
    t = data["input.t"]
    with torch.no_grad():
        for i, x in enumerate(xs):
            n = tokens(x)
            mod = model.embed_time(timesteps(t, i, n), n)
            e_tok = mod.per_token(mod.e).expand(1, n, -1)
            ref_e = data["debug.time_embedding"][i : i + 1, :n]
            assert torch.allclose(e_tok, ref_e, atol=1e-5, rtol=1e-5)
            ref_e0 = data["debug.time_projection"][i : i + 1, :n]
            e0 = mod.per_token(mod.e0.flatten(2)).expand(1, n, -1)
            assert torch.allclose(e0, ref_e0, atol=1e-5, rtol=1e-5)
            txt = model.embed_text(contexts[i][None])
            assert torch.allclose(txt, data["debug.text_embedding"][i : i + 1], atol=1e-5, rtol=1e-5)
