"""LoRA loading: every key style maps to the official parameters, the float32 merge equals the low-rank
update applied explicitly at run time, and every bad file is one readable error naming file and keys."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lora_files import MODULES, STYLES, lowrank_factors, write_lora
from safetensors.torch import load_file, save_file

from wan.checkpoint_reader import ReadError, read_safetensors_header, read_scalar
from wan.experts import ExpertPool
from wan.loading import load_transformer, locate_transformer_files, read_shapes
from wan.lora import LoraError, LoraMerge, LoraSpec, build_merge, check_loras, checkpoint_shapes
from wan.modules.transformer import WanTransformer
from wan.testing.dit import random_transformer_state_dict, tiny_transformer_config, write_transformer_folder

CFG = tiny_transformer_config("t2v")  # dim 32, ffn 64, 2 blocks
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_transformer_folder(
        tmp_path_factory.mktemp("dit") / "high_noise_model", CFG, seed=1, shards=2
    )


@pytest.fixture(scope="module")
def base(ckpt) -> dict[str, torch.Tensor]:
    return load_transformer(ckpt).state_dict()


@pytest.fixture(scope="module")
def factors(base):
    return lowrank_factors({k: v.shape for k, v in base.items()}, MODULES, rank=RANK, seed=5)


def merged_state(ckpt, specs, **kw) -> dict[str, torch.Tensor]:
    return load_transformer(ckpt, transform=build_merge(ckpt, specs), **kw).state_dict()


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, CFG.in_dim, 2, 4, 4, generator=gen)
    context = torch.randn(1, 5, CFG.text_dim, generator=gen)
    return x, torch.tensor([700]), context


# ---------------------------------------------------------------------------------------------------
# Key styles and the merge


@pytest.mark.parametrize("style", STYLES)
def test_every_key_style_merges_into_the_official_parameters(style, ckpt, base, factors, tmp_path):
    path = write_lora(tmp_path / f"{style}.safetensors", factors, style, alpha=ALPHA)
    state = merged_state(ckpt, [LoraSpec(path, 0.5)])
    touched = {f"{m}.weight" for m in factors}
    for key, value in state.items():
        if key in touched:
            down, up = factors[key.removesuffix(".weight")]
            expected = base[key] + 0.5 * ALPHA / RANK * (up @ down)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, base[key]), key


def test_merged_output_equals_the_low_rank_update_applied_at_run_time(ckpt, factors, tmp_path):
    """Two stacked LoRAs (kohya with alpha at scale 0.7, PEFT without alpha at scale -0.4) merged at load
    give the output of the untouched model whose Linears add scale * alpha/rank * x down^T up^T."""
    second = lowrank_factors(dict(checkpoint_shapes(ckpt)), MODULES[:2], rank=2, seed=9)
    a = write_lora(tmp_path / "a.safetensors", factors, "kohya", alpha=ALPHA)
    b = write_lora(tmp_path / "b.safetensors", second, "peft")
    merged = load_transformer(ckpt, transform=build_merge(ckpt, [LoraSpec(a, 0.7), LoraSpec(b, -0.4)]))

    plain = load_transformer(ckpt)
    updates = [(factors, 0.7 * ALPHA / RANK), (second, -0.4)]
    for module_name, module in plain.named_modules():
        terms = [(f[module_name], s) for f, s in updates if module_name in f]
        if terms:

            def hook(mod, args, out, terms=terms):
                x = args[0]
                return out + sum(s * (x @ down.T) @ up.T for (down, up), s in terms)

            module.register_forward_hook(hook)
    x, t, context = inputs()
    with torch.inference_mode():
        expected, got = plain(x, t, context), merged(x, t, context)
        untouched = load_transformer(ckpt)(x, t, context)
    assert (expected - untouched).abs().max() > 1e-2  # the LoRAs do change the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_differences_conv_lora_and_bf16(ckpt, base, tmp_path):
    gen = torch.Generator().manual_seed(3)
    diff = torch.randn(base["blocks.0.cross_attn.norm_k.weight"].shape, generator=gen)
    diff_b = torch.randn(base["blocks.0.self_attn.q.bias"].shape, generator=gen)
    diff_mod = torch.randn(base["blocks.1.modulation"].shape, generator=gen)
    conv_w = base["patch_embedding.weight"]  # [dim, in, 1, 2, 2]
    down = torch.randn(2, *conv_w.shape[1:], generator=gen)
    up = torch.randn(conv_w.shape[0], 2, 1, 1, 1, generator=gen)
    tensors = {
        "diffusion_model.blocks.0.cross_attn.norm_k.diff": diff,
        "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b,
        "diffusion_model.blocks.1.modulation.diff": diff_mod,
        "diffusion_model.patch_embedding.lora_down.weight": down,
        "diffusion_model.patch_embedding.lora_up.weight": up,
    }
    path = tmp_path / "diff.safetensors"
    save_file(tensors, str(path))
    state = merged_state(ckpt, [LoraSpec(path, 2.0)])
    torch.testing.assert_close(
        state["blocks.0.cross_attn.norm_k.weight"], base["blocks.0.cross_attn.norm_k.weight"] + 2 * diff
    )
    torch.testing.assert_close(
        state["blocks.0.self_attn.q.bias"], base["blocks.0.self_attn.q.bias"] + 2 * diff_b
    )
    torch.testing.assert_close(state["blocks.1.modulation"], base["blocks.1.modulation"] + 2 * diff_mod)
    conv = (up.flatten(1) @ down.flatten(1)).reshape(conv_w.shape)
    torch.testing.assert_close(state["patch_embedding.weight"], conv_w + 2 * conv)
    # bf16 run: merged in float32, then cast once
    bf16 = merged_state(ckpt, [LoraSpec(path, 2.0)], dtype=torch.bfloat16)
    expected = (base["blocks.0.self_attn.q.bias"] + 2 * diff_b).to(torch.bfloat16)
    assert torch.equal(bf16["blocks.0.self_attn.q.bias"], expected)


def test_scale_zero_and_no_lora_leave_the_weights_untouched(ckpt, base, factors, tmp_path):
    path = write_lora(tmp_path / "z.safetensors", factors, "kohya", alpha=ALPHA)
    for key, value in merged_state(ckpt, [LoraSpec(path, 0.0)]).items():
        assert torch.equal(value, base[key]), key
    assert build_merge(ckpt, []) is None


def test_bf16_lora_file_alpha_and_factor(ckpt, factors, tmp_path):
    path = write_lora(tmp_path / "h.safetensors", factors, "kohya", alpha=ALPHA, dtype=torch.bfloat16)
    (lora,) = check_loras(ckpt, [LoraSpec(path, 1.5)])
    assert lora.ranks == (RANK,) and len(lora.patches) == len(factors)
    assert {p.factor for p in lora.patches} == {1.5 * ALPHA / RANK}


def test_expert_pool_merges_each_experts_own_loras(tmp_path, factors):
    paths = {
        name: write_transformer_folder(tmp_path / name, CFG, seed=i) for i, name in enumerate(("high", "low"))
    }
    path = write_lora(tmp_path / "l.safetensors", factors, "kohya", alpha=ALPHA)
    loras = {"high": [LoraSpec(path)], "low": []}
    pool = ExpertPool(
        paths, dtype=torch.float32, device=torch.device("cpu"), offload=False, keep_inactive=True, loras=loras
    )
    key = "blocks.0.self_attn.q.weight"
    assert not torch.equal(
        pool.activate("high").state_dict()[key], load_transformer(paths["high"]).state_dict()[key]
    )
    assert torch.equal(
        pool.activate("low").state_dict()[key], load_transformer(paths["low"]).state_dict()[key]
    )


def test_merge_reports_parameters_the_loader_skipped(ckpt, factors, tmp_path):
    path = write_lora(tmp_path / "s.safetensors", factors, "kohya")
    merge = LoraMerge(check_loras(ckpt, [LoraSpec(path)]))
    with pytest.raises(LoraError, match=r"was not merged into blocks\.0"):
        merge.finish()


# ---------------------------------------------------------------------------------------------------
# Strict checks: one line naming the file and the first offending keys


def one_line_error(ckpt, path, match, scale=1.0):
    with pytest.raises(LoraError, match=match) as info:
        check_loras(ckpt, [LoraSpec(path, scale)], where="the high-noise transformer")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_bad_files(ckpt, tmp_path):
    one_line_error(ckpt, tmp_path / "missing.safetensors", "not found")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a tensor file at all")
    one_line_error(ckpt, text, "is not a safetensors LoRA file")
    full = tmp_path / "full.safetensors"
    save_file(random_transformer_state_dict(CFG), str(full))
    one_line_error(ckpt, full, r"is not a LoRA: .*its keys look like blocks\.0\.")
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    one_line_error(ckpt, empty, "holds no tensors")


def test_bad_keys(ckpt, factors, tmp_path):
    down, up = factors["blocks.0.self_attn.q"]
    unknown = {"blocks.7.self_attn.q": (down, up)}
    bad_rank = {"blocks.0.self_attn.q": (down, torch.zeros(up.shape[0], RANK + 1))}
    cases = {
        "unknown": (unknown, r"match no parameter of the high-noise transformer.*blocks\.7"),
        "rank": (bad_rank, "ranks differ"),
    }
    for name, (fac, match) in cases.items():
        one_line_error(ckpt, write_lora(tmp_path / f"{name}.safetensors", fac, "kohya"), match)
    lonely = tmp_path / "lonely.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down}, str(lonely))
    one_line_error(
        ckpt, lonely, r"without their .*partner: diffusion_model\.blocks\.0\.self_attn\.q\.lora_down"
    )
    mid = tmp_path / "locon.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_mid.weight": down}, str(mid))
    one_line_error(ckpt, mid, "not supported.*lora_mid")
    twice = tmp_path / "twice.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
            "lora_unet_blocks_0_self_attn_q.lora_down.weight": down.clone(),
        },
        str(twice),
    )
    one_line_error(ckpt, twice, "updates one parameter twice")
    ints = tmp_path / "ints.safetensors"
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down.to(torch.int32),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
        },
        str(ints),
    )
    one_line_error(ckpt, ints, "not floating point")
    junk = tmp_path / "junk.safetensors"
    save_file(
        {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": down, "step": torch.zeros(1)}, str(junk)
    )
    one_line_error(ckpt, junk, "keys that are not LoRA tensors: step")


def test_lora_for_another_model_width(ckpt, tmp_path):
    """A LoRA for a wider and deeper model (as A14B's on ti2v-5B) names the width, not the extra blocks."""
    wide = tiny_transformer_config("t2v", dim=64, ffn_dim=128, num_layers=3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanTransformer(wide).state_dict().items()}
    factors = lowrank_factors(shapes, MODULES, blocks=3)
    path = write_lora(tmp_path / "wide.safetensors", factors, "kohya", alpha=ALPHA)
    message = one_line_error(ckpt, path, r"does not fit the high-noise transformer \(dim 32\): shapes differ")
    assert "[4, 64]" in message and "[32, 32]" in message


# ---------------------------------------------------------------------------------------------------
# The torch-free header reader


def test_header_reader_matches_safetensors(ckpt, tmp_path):
    files = locate_transformer_files(ckpt)
    assert checkpoint_shapes(ckpt) == {k: v[0] for k, v in read_shapes(files).items()}
    values = {"f32": (torch.float32, 1.25), "f16": (torch.float16, -3.5), "bf16": (torch.bfloat16, 8.0)}
    path = tmp_path / "scalars.safetensors"
    save_file({k: torch.tensor(v, dtype=d) for k, (d, v) in values.items()}, str(path))
    header = read_safetensors_header(path)
    for key, (_, value) in values.items():
        assert read_scalar(path, header[key]) == value
    assert load_file(str(path))["f32"].item() == 1.25
    data = path.read_bytes()
    path.write_bytes(data[:-2])
    with pytest.raises(ReadError, match="is truncated: tensor"):
        read_safetensors_header(path)
    with pytest.raises(ReadError, match="one value"):
        read_scalar(ckpt / "x", read_safetensors_header(files.shards[0])["blocks.0.self_attn.q.weight"])
    assert math.prod(read_safetensors_header(files.shards[0])["blocks.0.self_attn.q.weight"].shape) == 32 * 32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_on_the_gpu_equals_the_cpu_merge(ckpt, factors, tmp_path):
    path = write_lora(tmp_path / "g.safetensors", factors, "kohya", alpha=ALPHA)
    files = check_loras(ckpt, [LoraSpec(path, 0.8)])
    cpu, gpu = LoraMerge(files), LoraMerge(files, device="cuda")
    base = load_transformer(ckpt).state_dict()
    for key, value in base.items():
        torch.testing.assert_close(gpu(key, value).cpu(), cpu(key, value), rtol=1e-5, atol=1e-6)
    model = load_transformer(
        ckpt, dtype=torch.bfloat16, device="cuda", transform=LoraMerge(files, device="cuda")
    )
    assert next(model.parameters()).device.type == "cuda"
