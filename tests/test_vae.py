"""Wan2.1 / Wan2.2 VAEs: golden parity, loading, error messages, tiled decoding, streaming state."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from goldens import entry, golden_params, tensors, weights_path
from safetensors.torch import save_file

from wan.errors import CheckpointError
from wan.testing.vae import tiny_vae_state_dict
from wan.vae import WanVAE, blend_ramp, load_vae, tile_spans, vae_from_state_dict

# (input key, output key, method) of a VAE golden; every output.* key must be one of these.
GOLDEN_CALLS = (
    ("input.video", "output.latent", "encode"),
    ("input.image", "output.image_latent", "encode"),
    ("input.latent", "output.video", "decode"),
)


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def tiny_vae(request) -> WanVAE:
    kind = request.param
    return vae_from_state_dict(tiny_vae_state_dict(kind, dim=4, dec_dim=None if kind == "2.1" else 6))


def _video(kind: str, frames: int, h: int, w: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, h, w, generator=gen) * 2 - 1


def _latents(vae: WanVAE, frames: int, h: int, w: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vae.z_dim, frames, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Golden parity against the official code (tolerance: 1e-4 relative, 2e-5 x max|ref| absolute)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", golden_params("vae"))
def test_golden_parity(name: str) -> None:
    spec, golden = entry(name), tensors(name)
    vae = load_vae(weights_path(spec["weights"]))
    outputs = {k for k in spec["tensors"] if k.startswith("output.")}
    assert outputs <= {out for _, out, _ in GOLDEN_CALLS}, f"untested outputs in golden {name}"
    for in_key, out_key, method in GOLDEN_CALLS:
        if out_key not in golden:
            continue
        ref = golden[out_key]
        assert list(ref.shape) == spec["tensors"][out_key]["shape"]
        got = getattr(vae, method)(golden[in_key][None])[0]
        if method == "decode":
            ref = ref.clamp(-1, 1)  # the golden may hold the unclamped video
        assert got.shape == ref.shape, (out_key, got.shape, ref.shape)
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-5 * scale, msg=f"{name} {out_key}")


def test_real_architectures_match_official_counts() -> None:
    """At the official widths the models have upstream's tensor and parameter counts (spec section 6)."""
    from wan.vae import VaeConfig

    for config, tensors_, params in (
        (VaeConfig("2.1", 96, 96, 16, 2), 194, 126_892_531),
        (VaeConfig("2.2", 160, 256, 48, 2), 196, 704_688_668),
    ):
        with torch.device("meta"):
            model = config.build()
        assert len(model.state_dict()) == tensors_
        assert sum(p.numel() for p in model.parameters()) == params


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dec_dim"), [("2.1", None), ("2.2", 6)])
def test_loads_pth_and_safetensors_alike(tmp_path, kind: str, dec_dim: int | None) -> None:
    state = tiny_vae_state_dict(kind, dim=4, dec_dim=dec_dim, seed=3)
    torch.save(state, tmp_path / "vae.pth")
    save_file(state, tmp_path / "vae.safetensors")
    from_pth, from_st = load_vae(tmp_path / "vae.pth"), load_vae(str(tmp_path / "vae.safetensors"))
    assert (from_pth.kind, from_pth.z_dim) == (kind, 16 if kind == "2.1" else 48)
    assert from_pth.stride == ((4, 8, 8) if kind == "2.1" else (4, 16, 16))
    z = _latents(from_pth, 2, 2, 3)
    assert torch.equal(from_pth.decode(z), from_st.decode(z))


def test_error_missing_file(tmp_path) -> None:
    path = tmp_path / "Wan2.1_VAE.pth"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_vae(path)
    assert isinstance(info.value, CheckpointError)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_error_truncated_file(tmp_path, suffix: str) -> None:
    state = tiny_vae_state_dict("2.1")
    path = tmp_path / f"vae{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_vae(path)
    assert "download it again" in str(info.value)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("state", "what"),
    [
        (
            {"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2), "head.modulation": torch.zeros(1, 2, 8)},
            "DiT",
        ),
        ({"token_embedding.weight": torch.zeros(10, 4), "blocks.0.attn.q.weight": torch.zeros(4, 4)}, "umT5"),
        ({"something.else": torch.zeros(2)}, "encoder.conv1.weight"),
    ],
)
def test_error_not_a_vae(tmp_path, state: dict, what: str) -> None:
    path = tmp_path / "model.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="not a Wan VAE checkpoint") as info:
        load_vae(path)
    assert what in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("decoder.head.2.bias"), "key 'decoder.head.2.bias' is missing"),
        (
            lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}),
            "unexpected key 'encoder.extra.weight'",
        ),
        (lambda s: s.update({"conv1.bias": torch.zeros(5)}), "key 'conv1.bias' has shape [5], expected [32]"),
    ],
)
def test_error_bad_keys(tmp_path, edit, message: str) -> None:
    state = tiny_vae_state_dict("2.1")
    edit(state)
    path = tmp_path / "vae.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError) as info:
        load_vae(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Shapes, streaming state, input checks
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes_round_trip(tiny_vae: WanVAE, frames: int) -> None:
    st, ss = tiny_vae.stride[0], tiny_vae.stride[1]
    video = _video(tiny_vae.kind, frames, 2 * ss, 3 * ss, batch=2)
    latents = tiny_vae.encode(video)
    assert latents.shape == (2, tiny_vae.z_dim, 1 + (frames - 1) // st, 2, 3)
    decoded = tiny_vae.decode(latents)
    assert decoded.shape == video.shape and decoded.dtype == torch.float32
    assert decoded.abs().max() <= 1 and decoded.std() > 1e-3


def test_batch_equals_single(tiny_vae: WanVAE) -> None:
    z = _latents(tiny_vae, 2, 2, 2, batch=2)
    both = tiny_vae.decode(z)
    torch.testing.assert_close(both[1:], tiny_vae.decode(z[1:]), rtol=1e-4, atol=1e-5)


def test_no_state_leaks_between_calls(tiny_vae: WanVAE) -> None:
    za, zb = _latents(tiny_vae, 3, 2, 2, seed=1), _latents(tiny_vae, 2, 2, 2, seed=2)
    first = tiny_vae.decode(za)
    tiny_vae.decode(zb)
    assert torch.equal(first, tiny_vae.decode(za))
    video = _video(tiny_vae.kind, 5, 16, 16)
    assert torch.equal(tiny_vae.encode(video), tiny_vae.encode(video))


def test_concurrent_decodes_match_sequential(tiny_vae: WanVAE) -> None:
    """The streaming caches live in each call, so calls from several threads do not interfere."""
    inputs = [_latents(tiny_vae, 3, 2, 2, seed=s) for s in range(3)]
    expected = [tiny_vae.decode(z) for z in inputs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(tiny_vae.decode, inputs))
    assert all(torch.equal(r, e) for r, e in zip(results, expected, strict=True))


def test_float32_inside_bf16_autocast(tiny_vae: WanVAE) -> None:
    z = _latents(tiny_vae, 2, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = tiny_vae.decode(z)
    assert inside.dtype == torch.float32 and torch.equal(inside, tiny_vae.decode(z))


def test_rejects_bad_shapes(tiny_vae: WanVAE) -> None:
    ss = tiny_vae.stride[1]
    with pytest.raises(ValueError, match="frames"):
        tiny_vae.encode(_video(tiny_vae.kind, 4, ss, ss))
    with pytest.raises(ValueError, match="divisible"):
        tiny_vae.encode(_video(tiny_vae.kind, 1, ss + 2, ss))
    with pytest.raises(ValueError, match="latents"):
        tiny_vae.decode(torch.zeros(1, tiny_vae.z_dim + 1, 1, 2, 2))


# ----------------------------------------------------------------------------------------------------
# Tiled decoding
# ----------------------------------------------------------------------------------------------------


def test_tile_spans_cover_and_blend_to_one() -> None:
    for length, tile, overlap in [(10, 4, 1), (17, 8, 2), (8, 8, 2), (5, 8, 2), (12, 4, 0)]:
        spans = tile_spans(length, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(e - s == min(tile, length) for s, e in spans)
        total = torch.zeros(length * 2)
        for span in spans:
            total[span[0] * 2 : span[1] * 2] += blend_ramp(spans, span, 2, torch.device("cpu"))
        torch.testing.assert_close(total, torch.ones_like(total))


def test_tiled_single_tile_is_exact(tiny_vae: WanVAE) -> None:
    z = _latents(tiny_vae, 2, 4, 5)
    assert torch.equal(tiny_vae.decode(z, tiled=True, tile_size=(4, 5)), tiny_vae.decode(z))
    assert torch.equal(tiny_vae.decode(z, tiled=True, tile_size=8, tile_overlap=2), tiny_vae.decode(z))


def test_tiled_close_to_untiled(tiny_vae: WanVAE) -> None:
    z = _latents(tiny_vae, 2, 10, 10, seed=5)
    full = tiny_vae.decode(z)
    tiled = tiny_vae.decode(z, tiled=True, tile_size=8, tile_overlap=4)
    assert tiled.shape == full.shape
    diff = (tiled - full).abs()
    # Not exact: the upsampling stages' receptive field (~12 latent cells on random weights) spans
    # several tiles. Measured here: mean 0.0045-0.006, max 0.064-0.093 (outputs: mean |x| 0.11-0.16).
    assert diff.mean() < 0.1 * full.abs().mean() and diff.max() < 0.15, (diff.mean(), diff.max())


def test_tiled_rejects_bad_tiles(tiny_vae: WanVAE) -> None:
    with pytest.raises(ValueError, match="tile_overlap"):
        tiny_vae.decode(_latents(tiny_vae, 1, 4, 4), tiled=True, tile_size=2, tile_overlap=2)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_errors_other_than_damage_propagate(tmp_path, monkeypatch, suffix: str) -> None:
    """Only a truncated or corrupt file is worth downloading again: running out of host memory while
    reading a sound file is reported as itself, not as a bad download."""
    from wan.checkpoint_reader import MappedSafetensors

    path = tmp_path / f"vae{suffix}"
    state = tiny_vae_state_dict("2.1")
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate memory")

    monkeypatch.setattr(torch, "load", out_of_memory)
    monkeypatch.setattr(MappedSafetensors, "tensor", out_of_memory)
    with pytest.raises(MemoryError):
        load_vae(path)
