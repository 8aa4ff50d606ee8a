"""Single-file checkpoints (Comfy-Org's repackaged files, plain float8 files, Hugging Face T5 names, VAE
safetensors) load to the same tensors as the official tiny checkpoints (float8 within its quantisation
error, and exactly the file's dequantised values), through the loaders real checkpoints use."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from single_files import (
    DIT_FORMATS,
    FP8,
    PREFIX,
    comfy_dit_state,
    dequantised_state,
    hf_t5_state,
    loaded_values,
    official_dit_state,
    write_single_file,
)

from wan.checkpoint_reader import TensorInfo
from wan.errors import CheckpointError
from wan.loading import load_transformer, read_transformer_config
from wan.modules.fp8_linear import fp8_layers
from wan.text_encoder import load_text_encoder
from wan.vae import read_state_dict
from wan.weight_files import ScaledFloat8
from wan.weight_formats import FormatError, dit_kind, dit_layout, t5_layout, vae_layout


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_source) -> Path:
    return tiny_checkpoint_source("t2v-A14B")


@pytest.fixture(scope="module")
def high_state(ckpt) -> dict[str, torch.Tensor]:
    return official_dit_state(ckpt / "high_noise_model")


def info(dtype: str, *shape: int) -> TensorInfo:
    return TensorInfo(dtype, tuple(shape))


# ---------------------------------------------------------------------------------------------------
# The layouts, from headers only


def test_prefixed_scaled_fp8_layout_pairs_scales_and_sets_markers_aside():
    table = {
        f"{PREFIX}blocks.0.ffn.0.weight": info("float8_e4m3fn", 8, 4),
        f"{PREFIX}blocks.0.ffn.0.scale_weight": info("float32"),
        f"{PREFIX}blocks.0.ffn.0.scale_input": info("float32"),
        f"{PREFIX}blocks.0.ffn.0.bias": info("float16", 8),
        f"{PREFIX}patch_embedding.weight": info("float16", 8, 16, 1, 2, 2),
        f"{PREFIX}patch_embedding.scale_weight": info("float32"),  # dummy: the float16 weight decides
        "scaled_fp8": info("float8_e4m3fn", 0),
    }
    layout = dit_layout(table)
    assert layout.prefix == PREFIX and not layout.identity and layout.float8
    assert set(layout.sources) == {"blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias", "patch_embedding.weight"}
    assert layout.sources["blocks.0.ffn.0.weight"].scale == f"{PREFIX}blocks.0.ffn.0.scale_weight"
    assert layout.sources["patch_embedding.weight"].scale is None
    assert dit_kind(layout.shapes) == "t2v"


def test_row_scales_are_paired_and_block_scales_refused():
    table = {"head.head.weight": info("float8_e4m3fn", 8, 4), "head.head.weight_scale": info("float32", 8, 1)}
    assert dit_layout(table).sources["head.head.weight"].scale == "head.head.weight_scale"
    table["head.head.weight_scale"] = info("float32", 8, 2)  # block-wise: not a format this reader knows
    with pytest.raises(FormatError, match="per-tensor and per-row"):
        dit_layout(table)


def test_official_layout_is_the_identity():
    table = {
        "blocks.0.ffn.0.weight": info("bfloat16", 8, 4),
        "patch_embedding.weight": info("bfloat16", 8, 48, 1, 2, 2),
    }
    layout = dit_layout(table)
    assert layout.identity and dit_kind(layout.shapes) == "ti2v"


def test_hf_t5_names_map_to_wan_names_and_the_embedded_tokenizer_is_found():
    table = {
        "shared.weight": info("float16", 64, 32),
        "encoder.embed_tokens.weight": info("float16", 64, 32),
        "encoder.block.0.layer.0.SelfAttention.q.weight": info("float16", 32, 32),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": info("float16", 32, 2),
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": info("float16", 64, 32),
        "encoder.final_layer_norm.weight": info("float16", 32),
        "spiece_model": info("uint8", 100),
    }
    layout = t5_layout(table)
    assert layout.hf_names and layout.tokenizer_key == "spiece_model"
    assert set(layout.sources) == {
        "token_embedding.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.pos_embedding.embedding.weight",
        "blocks.0.ffn.gate.0.weight",
        "norm.weight",
    }


def test_hf_t5_with_only_the_tied_embedding_name_uses_it():
    table = {
        "encoder.embed_tokens.weight": info("float16", 64, 32),
        "encoder.block.0.layer.0.SelfAttention.q.weight": info("float16", 32, 32),
    }
    assert set(t5_layout(table).sources) == {"token_embedding.weight", "blocks.0.attn.q.weight"}


def test_vae_layout_drops_markers():
    layout = vae_layout(
        {"conv2.weight": info("float16", 32, 32, 1, 1, 1), "scaled_fp8": info("float8_e4m3fn", 0)}
    )
    assert set(layout.sources) == {"conv2.weight"}


def test_dequantise_broadcasts_a_row_scale():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).to(FP8)
    row = ScaledFloat8(weight, torch.tensor([[2.0], [0.5]])).dequantise()
    assert torch.equal(row, torch.tensor([[2.0, 4.0], [1.5, 2.0]]))
    assert torch.equal(ScaledFloat8(weight, torch.tensor(3.0)).dequantise(), weight.float() * 3)


# ---------------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("fmt", DIT_FORMATS)
@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_single_file_dit_loads_the_files_values(tmp_path, ckpt, high_state, fmt, prefix):
    file_state = comfy_dit_state(high_state, fmt, prefix=prefix)
    path = write_single_file(tmp_path / "dit.safetensors", file_state, config_from=ckpt / "high_noise_model")
    assert read_transformer_config(path) == read_transformer_config(ckpt / "high_noise_model")
    model = load_transformer(path, dtype=torch.float32)
    loaded = dequantised_state(model)  # an fp8 file's block Linears stay fp8: compare their values
    assert bool(fp8_layers(model)) == fmt.startswith("fp8")
    expected = loaded_values(file_state, prefix=prefix)
    assert set(loaded) == set(expected) == set(high_state)
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key  # exactly the file's (dequantised) values
        original = high_state[key]
        if fmt.startswith("fp8") and file_state[prefix + key].dtype == FP8:
            # e4m3: 3 mantissa bits, a relative error of at most 2^-4 (plus the subnormal step)
            scale = original.abs().amax() / 448 if fmt != "fp8" else torch.tensor(1.0)
            bound = original.abs() * 2**-4 + scale * 2**-9 + 1e-12
            assert ((value - original).abs() <= bound).all(), key
        elif fmt in ("fp32",):
            assert torch.equal(value, original), key
        else:
            assert torch.allclose(value, original, rtol=2**-7, atol=1e-6), key


def test_a_file_without_config_json_reads_its_architecture_from_shapes(tmp_path, high_state):
    path = write_single_file(tmp_path / "dit.safetensors", comfy_dit_state(high_state, "fp16"))
    config = read_transformer_config(path)
    assert (config.model_type, config.in_dim, config.num_layers) == ("t2v", 16, 2)


def test_hf_named_t5_loads_like_the_official_pth(tmp_path, ckpt):
    official_path = ckpt / "models_t5_umt5-xxl-enc-bf16.pth"
    official = torch.load(official_path, weights_only=True)
    reference = load_text_encoder(official_path, dtype=torch.float32).state_dict()
    same = tmp_path / "umt5_xxl_bf16.safetensors"
    save_file(hf_t5_state(official), str(same))
    for key, value in load_text_encoder(same, dtype=torch.float32).state_dict().items():
        assert torch.equal(value, reference[key]), key
    scaled = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(hf_t5_state(official, "fp8_scaled"), str(scaled))
    for key, value in load_text_encoder(scaled, dtype=torch.float32).state_dict().items():
        assert torch.allclose(value, reference[key], rtol=2**-4, atol=reference[key].abs().max() / 448), key


def test_vae_safetensors_loads_like_the_pth(tmp_path, ckpt):
    official = read_state_dict(ckpt / "Wan2.1_VAE.pth")
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in official.items()}, str(path))
    loaded = read_state_dict(path)
    assert set(loaded) == set(official)
    for key, value in loaded.items():
        assert torch.equal(value.float(), official[key].to(torch.float16).float()), key


def test_a_truncated_single_file_is_refused_before_loading(tmp_path, high_state):
    path = write_single_file(tmp_path / "dit.safetensors", comfy_dit_state(high_state, "fp8_scaled"))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_transformer(path)
