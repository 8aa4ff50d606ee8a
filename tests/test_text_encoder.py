"""umT5 encoder: golden parity with upstream's T5Encoder, loading, key mapping, encode() and errors."""

import pytest
import torch
from goldens import entry, golden_params, indexed, tensors, weights_entry, weights_path
from safetensors.torch import load_file, save_file

from wan.errors import CheckpointError
from wan.testing.text import tiny_t5_state_dict, write_tiny_tokenizer
from wan.text_encoder import OFFICIAL_FILE, hf_key, load_text_encoder, text_encoder_from_state_dict
from wan.tokenizer import load_tokenizer

# fp32 vs upstream fp32: measured max abs 1.5e-6 at magnitude ~4 (op order only)
ATOL, RTOL = 2e-5, 1e-5


@pytest.mark.parametrize("name", golden_params("t5_encoder"))
def test_golden_encoder(name):
    golden, t = entry(name), tensors(name)
    encoder = load_text_encoder(weights_path(golden["weights"]), dtype=torch.float32)
    dims = weights_entry(golden["weights"])["config"]
    config = encoder.config
    assert (config.vocab_size, config.dim, config.dim_attn, config.dim_ffn) == (
        dims["vocab_size"],
        dims["dim"],
        dims["dim_attn"],
        dims["dim_ffn"],
    )
    assert (config.num_heads, config.num_layers, config.num_buckets) == (
        dims["num_heads"],
        dims["encoder_layers"],
        dims["num_buckets"],
    )

    block_outputs = []
    hooks = [
        block.register_forward_hook(
            lambda m, i, out: block_outputs.append(out[0] if isinstance(out, tuple) else out)
        )
        for block in encoder.model.encoder.block
    ]
    hidden = encoder(t["input.ids"], t["input.mask"])
    for hook in hooks:
        hook.remove()
    assert hidden.dtype == torch.float32
    torch.testing.assert_close(hidden, t["output.hidden"], atol=ATOL, rtol=RTOL)
    assert len(block_outputs) == config.num_layers
    for got, want in zip(block_outputs, indexed(t, "debug.block_out"), strict=False):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)

    # relative-position buckets [q, k], through transformers' own bucketing
    attention = encoder.model.encoder.block[0].layer[0].SelfAttention
    for key in (k for k in t if k.startswith("debug.rel_bucket_")):
        position = torch.arange(t[key].shape[0])
        buckets = attention._relative_position_bucket(position[None, :] - position[:, None])
        assert torch.equal(buckets.to(t[key].dtype), t[key])


@pytest.mark.parametrize("name", golden_params("t5_encoder"))
def test_golden_real_tokens_only(name):
    """Each prompt run on its real tokens alone gives upstream's padded run's real rows."""
    golden, t = entry(name), tensors(name)
    encoder = load_text_encoder(weights_path(golden["weights"]), dtype=torch.float32)
    lengths = t["input.mask"].sum(1).tolist()
    assert min(lengths) < t["input.ids"].shape[1]  # the golden pads at least one prompt
    for ids, want, n in zip(t["input.ids"], t["output.hidden"], lengths, strict=True):
        real = ids[None, :n]
        got = encoder(real, torch.ones_like(real))[0]
        torch.testing.assert_close(got, want[:n], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", golden_params("t5_encoder"))
def test_golden_weights_from_bf16_pth(name, tmp_path):
    """The official file is a torch.save'd bf16 state dict; loading it matches the golden copy."""
    golden, t = entry(name), tensors(name)
    path = weights_path(golden["weights"])
    reference = load_text_encoder(path)  # bf16 by default, as upstream
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / OFFICIAL_FILE)
    encoder = load_text_encoder(tmp_path)  # a checkpoint folder holding the official file name
    assert encoder.dtype == torch.bfloat16
    ids, mask = t["input.ids"], t["input.mask"]
    assert torch.equal(encoder(ids, mask), reference(ids, mask))


# --- tiny random encoders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state():
    return tiny_t5_state_dict(
        vocab_size=96, dim=32, dim_attn=48, dim_ffn=40, num_heads=4, num_layers=3, seed=1
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("ckpt") / "google" / "umt5-xxl"))


def test_config_and_key_mapping(tiny_state):
    encoder = text_encoder_from_state_dict(tiny_state, dtype=torch.float32)
    config = encoder.config
    assert (config.vocab_size, config.dim, config.dim_attn, config.dim_ffn) == (96, 32, 48, 40)
    assert (config.num_heads, config.num_layers, config.num_buckets) == (4, 3, 32)
    hf = encoder.model.config
    assert (hf.d_kv, hf.relative_attention_max_distance, hf.dense_act_fn, hf.is_gated_act) == (
        12,
        128,
        "gelu_new",
        True,
    )
    params = dict(encoder.model.named_parameters(remove_duplicate=False))
    assert len(params) == len(tiny_state) + 1  # token_embedding feeds shared and encoder.embed_tokens
    for key, value in tiny_state.items():
        assert torch.equal(params[hf_key(key)], value)
    assert encoder.model.shared.weight is encoder.model.encoder.embed_tokens.weight
    assert not any(p.is_meta or p.requires_grad for p in params.values())
    assert hf_key("blocks.2.ffn.gate.0.weight") == "encoder.block.2.layer.1.DenseReluDense.wi_0.weight"


def test_pth_and_safetensors_load_alike_with_dtype_conversion(tiny_state, tmp_path):
    bf16_state = {k: v.to(torch.bfloat16) for k, v in tiny_state.items()}
    torch.save(bf16_state, tmp_path / "t5.pth")
    save_file(bf16_state, tmp_path / "t5.safetensors")
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0

    from_pth = load_text_encoder(tmp_path / "t5.pth", dtype=torch.float32)
    from_safetensors = load_text_encoder(tmp_path / "t5.safetensors", dtype=torch.float32)
    assert from_pth.dtype == from_safetensors.dtype == torch.float32
    assert torch.equal(
        from_pth.model.encoder.block[1].layer[1].DenseReluDense.wo.weight,
        bf16_state["blocks.1.ffn.fc2.weight"].float(),
    )
    out = from_pth(ids, mask)
    assert out.shape == (2, 20, 32) and out.dtype == torch.float32
    assert torch.equal(out, from_safetensors(ids, mask))

    in_bf16 = load_text_encoder(tmp_path / "t5.pth")
    assert in_bf16(ids, mask).dtype == torch.bfloat16


PROMPTS = [
    "a cat walks on the grass, realistic",
    "a dog",
    "Summer beach vacation style, a white cat",
    "a tea",
    "",
]


def test_encode_runs_real_tokens_only(tiny_state, tokenizer):
    """encode() equals the padded run's real rows, running each length group unpadded."""
    encoder = text_encoder_from_state_dict(tiny_state, dtype=torch.float32)
    text_len = 32
    seen = []
    hook = encoder.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    contexts = encoder.encode(PROMPTS, tokenizer, text_len)
    hook.remove()

    ids, mask = tokenizer(PROMPTS, text_len)
    padded = encoder(ids, mask)
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == 4 and lengths[1] == lengths[3] and lengths[4] == 1  # "" is EOS alone
    # one unpadded batch per distinct length; the two equal-length prompts share one
    assert sorted(seen) == sorted({(lengths.count(n), n) for n in lengths})
    for context, row, n in zip(contexts, padded, lengths, strict=True):
        assert context.shape == (n, 32) and context.dtype == torch.float32
        torch.testing.assert_close(context, row[:n], atol=2e-6, rtol=1e-6)
    # batch-agnostic: a prompt encoded alone gives the same rows as in any batch
    for prompt, context in zip(PROMPTS, contexts, strict=True):
        torch.testing.assert_close(
            encoder.encode([prompt], tokenizer, text_len)[0], context, atol=2e-6, rtol=1e-6
        )


def test_encode_truncated_prompt_keeps_text_len(tiny_state, tokenizer):
    """A prompt longer than text_len runs at text_len (its EOS kept), as the padded run."""
    encoder = text_encoder_from_state_dict(tiny_state, dtype=torch.float32)
    long_prompt = " ".join(["a white cat on the beach"] * 20)
    text_len = 16
    (context,) = encoder.encode([long_prompt], tokenizer, text_len)
    ids, mask = tokenizer([long_prompt], text_len)
    assert mask.all() and context.shape == (text_len, 32)
    assert torch.equal(context, encoder(ids, mask)[0])


# --- one-line errors -----------------------------------------------------------------------------


def load_error(path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_text_encoder(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file(tmp_path):
    assert OFFICIAL_FILE in load_error(tmp_path / OFFICIAL_FILE)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tiny_state, tmp_path, suffix):
    path = tmp_path / f"t5{suffix}"
    torch.save(tiny_state, path) if suffix == ".pth" else save_file(tiny_state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "re-download" in load_error(path)


def test_vae_state_dict_is_named(tmp_path):
    vae = {f"{part}.conv1.weight": torch.zeros(4, 3, 3, 3, 3) for part in ("encoder", "decoder")}
    torch.save({**vae, "conv1.weight": torch.zeros(8, 8, 1, 1, 1)}, tmp_path / "Wan2.1_VAE.pth")
    assert "VAE" in load_error(tmp_path / "Wan2.1_VAE.pth")


def test_transformer_state_dict_is_named(tmp_path):
    save_file({"patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2)}, tmp_path / "dit.safetensors")
    assert "transformer" in load_error(tmp_path / "dit.safetensors")


def test_missing_unexpected_and_misshaped_keys(tiny_state, tmp_path):
    cases = {
        "missing": (
            {k: v for k, v in tiny_state.items() if k != "blocks.1.ffn.fc2.weight"},
            "blocks.1.ffn.fc2.weight",
        ),
        "unexpected": ({**tiny_state, "pos_embedding.embedding.weight": torch.zeros(32, 4)}, "pos_embedding"),
        "misshaped": (
            {**tiny_state, "blocks.2.attn.o.weight": torch.zeros(32, 32)},
            "blocks.2.attn.o.weight",
        ),
    }
    for case, (state, key) in cases.items():
        path = tmp_path / f"{case}.pth"
        torch.save(state, path)
        assert key in load_error(path), case
