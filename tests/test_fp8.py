"""fp8 weights (wan.fp8, wan.modules.fp8_linear): the arithmetic, quantising a transformer's block
Linears at load, LoRA merges, streaming fp8 blocks, the planner's byte count, and the CLI options."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_runs import frames, run_cli
from lora_files import lowrank_factors, write_lora
from torch import nn

import wan
from wan.fp8 import FP8, FP8_MAX, dequantize, merge_delta, quantize, scaled_mm_capable
from wan.loading import locate_transformer_files, read_shapes
from wan.lora import LoraSpec, build_merge
from wan.memory_costs import block_bytes, block_linear_weight_params, block_params
from wan.modules.fp8_linear import BLOCK_LINEARS, Fp8Linear, fp8_layers, quantize_model
from wan.placement import Placement, streamed_source
from wan.testing.checkpoint import write_tiny_checkpoint
from wan.testing.dit import tiny_transformer_config, write_transformer_folder
from wan.weight_storage import WeightStorage

CPU = torch.device("cpu")
FP8_STORAGE = WeightStorage(torch.float32, quantize="fp8")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = tiny_transformer_config("t2v", num_layers=4)
    return write_transformer_folder(tmp_path_factory.mktemp("dit") / "m", cfg, seed=11)


def inputs(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 8, generator=gen)
    context = [torch.randn(7, cfg.text_dim, generator=gen)]
    return x, torch.tensor([731]), context


def forward(model, seed=0):
    with torch.inference_mode():
        out = model(*inputs(model.config, seed))
    return out[0] if isinstance(out, list) else out


# ----------------------------------------------------------------------------------------------------
# The arithmetic
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_quantize_then_dequantize_is_the_manual_float_math(granularity):
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3] *= 20  # one row with a larger range: per-row scales differ
    q, scale = quantize(w, granularity)
    assert q.dtype == FP8 and scale.dtype == torch.float32
    assert scale.shape == (() if granularity == "tensor" else (48, 1))
    manual = q.float() * scale  # ComfyUI's `weight.float() * scale_weight`
    assert torch.equal(dequantize(q, scale), manual)
    assert torch.equal(dequantize(q, scale, torch.bfloat16), manual.to(torch.bfloat16))  # one rounding
    assert q.float().abs().max() == FP8_MAX  # the largest magnitude lands on the format's maximum
    error = ((manual - w).norm() / w.norm()).item()
    assert 0 < error < 0.04  # e4m3: 3 mantissa bits, about 2.6% relative on Gaussian weights


def test_zero_tensor_quantises_to_zeros_without_nan():
    q, scale = quantize(torch.zeros(16, 16))
    assert torch.equal(dequantize(q, scale), torch.zeros(16, 16)) and scale > 0


def test_fp8_linear_float32_equals_a_linear_holding_the_dequantised_values():
    gen = torch.Generator().manual_seed(1)
    w, b, x = (
        torch.randn(64, 32, generator=gen),
        torch.randn(64, generator=gen),
        torch.randn(3, 5, 32, generator=gen),
    )
    q, scale = quantize(w)
    layer = Fp8Linear.from_quantized(q, scale, b)
    assert layer.weight.dtype == FP8 and layer.bias.dtype == torch.float32
    assert torch.equal(layer(x), F.linear(x, q.float() * scale, b))
    bf16 = Fp8Linear.from_quantized(q, scale, b.bfloat16(), compute_dtype=torch.bfloat16)
    expected = F.linear(x.bfloat16(), (q.float() * scale).bfloat16(), b.bfloat16())
    assert torch.equal(bf16(x.bfloat16()), expected)


def test_merge_delta_dequantises_adds_in_float32_and_requantises():
    gen = torch.Generator().manual_seed(2)
    w, delta = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    for granularity in ("tensor", "row"):
        q, scale = quantize(w, granularity)
        merged, merged_scale = merge_delta(q, scale, delta)
        expected, expected_scale = quantize(q.float() * scale + delta, granularity)
        assert torch.equal(merged.view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(merged_scale, expected_scale)


# ----------------------------------------------------------------------------------------------------
# Quantising a transformer
# ----------------------------------------------------------------------------------------------------


def test_quantize_model_replaces_only_the_block_linears(folder):
    model = quantize_model(wan.load_transformer(folder), compute_dtype=torch.float32)
    quantized = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    expected = {f"blocks.{i}.{name}" for i in range(len(model.blocks)) for name in BLOCK_LINEARS}
    assert quantized == expected
    others = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    assert others and all(not name.startswith("blocks.") for name in others)  # embeddings, time, head
    for name, param in model.named_parameters():
        fp8 = param.dtype == FP8
        assert fp8 == (name.endswith(".weight") and name.removesuffix(".weight") in expected), name


def test_quantising_at_load_equals_quantising_the_loaded_model(folder):
    at_load = wan.load_transformer(folder, storage=FP8_STORAGE)
    after = quantize_model(wan.load_transformer(folder), compute_dtype=torch.float32)
    ref, got = after.state_dict(), at_load.state_dict()
    assert set(ref) == set(got)
    for key, value in ref.items():
        assert value.dtype == got[key].dtype and torch.equal(value.float(), got[key].float()), key
    plain = forward(wan.load_transformer(folder))
    out = forward(at_load)
    assert torch.equal(out, forward(after))
    error = ((out - plain).norm() / plain.norm()).item()
    assert 0 < error < 0.1  # changed, and close


def test_streamed_fp8_blocks_equal_resident_ones_and_copy_fp8_bytes(folder):
    resident = wan.load_transformer(folder, storage=FP8_STORAGE)
    streamed = wan.load_transformer(
        folder, storage=FP8_STORAGE, placement=Placement(CPU, resident_blocks=1, pin=False)
    )
    source = streamed_source(streamed)
    assert source is not None and FP8 in {flat.dtype for flat in source.host[1].flats}
    assert all(isinstance(m, Fp8Linear) for buf in source.buffers for m in [buf.self_attn.q, buf.ffn[2]])
    for seed in range(2):  # the buffers are reused call after call
        assert torch.equal(forward(streamed, seed), forward(resident, seed))
    plain = wan.load_transformer(folder, placement=Placement(CPU, resident_blocks=1, pin=False))
    fp8_bytes, fp32_bytes = source.layout.nbytes, streamed_source(plain).layout.nbytes
    cfg = resident.config
    saved = block_linear_weight_params(cfg.dim, cfg.ffn_dim) * 3  # 4 -> 1 byte per weight
    assert fp32_bytes - fp8_bytes >= saved - 4096  # (alignment padding and scales aside)


def test_lora_merges_in_float32_before_quantising_at_load(folder, tmp_path):
    shapes = {k: v[0] for k, v in read_shapes(locate_transformer_files(folder)).items()}
    lora = write_lora(tmp_path / "l.safetensors", lowrank_factors(shapes, ["self_attn.q", "ffn.2"], seed=3))
    merged = wan.load_transformer(
        folder, storage=FP8_STORAGE, transform=build_merge(folder, [LoraSpec(lora, 0.8)])
    )
    float_merged = wan.load_transformer(folder, transform=build_merge(folder, [LoraSpec(lora, 0.8)]))
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        layer = merged.get_submodule(name)
        q, scale = quantize(float_merged.get_submodule(name).weight)
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(layer.scale_weight, scale)


def test_lora_merges_into_weights_held_in_fp8(folder, tmp_path):
    shapes = {k: v[0] for k, v in read_shapes(locate_transformer_files(folder)).items()}
    factors = lowrank_factors(shapes, ["cross_attn.v"], seed=4)
    lora = write_lora(tmp_path / "l.safetensors", factors)
    merge = build_merge(folder, [LoraSpec(lora, 0.5)])
    key = "blocks.0.cross_attn.v.weight"
    q, scale = quantize(torch.randn(shapes[key]))
    merged, merged_scale = merge.merge_quantized(key, q, scale)
    down, up = factors["blocks.0.cross_attn.v"]
    expected = quantize(q.float() * scale + 0.5 * up @ down)
    assert torch.equal(merged.view(torch.uint8), expected[0].view(torch.uint8))
    assert torch.allclose(merged_scale, expected[1])
    untouched = merge.merge_quantized("blocks.0.cross_attn.k.weight", q, scale)
    assert untouched[0] is q and untouched[1] is scale
    layer = Fp8Linear.from_quantized(q, scale)
    layer.merge_(0.5 * up @ down)
    assert torch.equal(layer.weight.view(torch.uint8), merged.view(torch.uint8))


# ----------------------------------------------------------------------------------------------------
# The planner and the weight storage
# ----------------------------------------------------------------------------------------------------


def test_planner_counts_fp8_block_weights():
    from wan.configs import TASKS
    from wan.memory_plan import MemoryRequest

    dit = tiny_transformer_config("t2v", dim=5120, ffn_dim=13824)  # an A14B block's widths
    base = MemoryRequest(
        TASKS["t2v-A14B"], dit, 832, 480, 81, 8 * 2**30, weight_bytes=4, autocast_linear_bytes=2
    )
    fp8 = MemoryRequest(
        TASKS["t2v-A14B"],
        dit,
        832,
        480,
        81,
        8 * 2**30,
        weight_bytes=4,
        autocast_linear_bytes=2,
        fp8_linears=True,
    )
    weights = block_linear_weight_params(5120, 13824)
    assert block_bytes(base) - block_bytes(fp8) == weights * (2 - 1) - 4 * 10
    assert block_bytes(fp8) < 0.55 * block_bytes(base) and block_params(5120, 13824) > weights


def test_weight_storage_dtypes_and_description():
    storage = WeightStorage.for_run(torch.float32, torch.device("cuda"), "fp8", fp8_matmul=True)
    assert storage.dtype_of("blocks.3.ffn.0.weight") == FP8
    assert storage.dtype_of("blocks.3.ffn.0.bias") == torch.bfloat16  # autocast regime: bf16 biases
    assert storage.dtype_of("blocks.3.ffn.0.scale_weight") == torch.float32
    assert storage.dtype_of("blocks.3.norm3.weight") == torch.float32
    assert storage.dtype_of("text_embedding.0.weight") == torch.bfloat16  # not quantised
    assert storage.dtype_of("head.head.weight") == torch.float32
    assert "fp8 matmul" in storage.precision()["dit_block_linears"]
    assert WeightStorage.for_run(torch.float32, CPU).describe() == "fp32"


# ----------------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------------

BASE = ["--size", "832*480", "--frame-num", "1", "--sample-steps", "3", "--base-seed", "7", "--device", "cpu"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-A14B", "t2v-A14B", seed=3)


def test_cli_quantize_fp8_runs_changes_the_frames_and_reports_it(ckpt, tmp_path):
    runs = {}
    for name, extra in (("plain", []), ("fp8", ["--quantize", "fp8"])):
        out = tmp_path / f"{name}.mp4"
        argv = ["--ckpt-dir", str(ckpt), "--save-file", str(out), *BASE, *extra]
        assert run_cli([*argv, "--save-frames", str(tmp_path / name)]) == 0
        runs[name] = (frames(tmp_path / name).astype(float), json.loads(out.with_suffix(".json").read_text()))
    (plain, plain_meta), (fp8, fp8_meta) = runs["plain"], runs["fp8"]
    assert plain_meta["precision"]["dit_block_linears"] == "fp32 weights, fp32 compute"
    assert fp8_meta["precision"]["dit_block_linears"].startswith("fp8 e4m3 weights, per-tensor")
    assert "dequantised to fp32" in fp8_meta["weights"] and fp8_meta["request"]["quantize"] == "fp8"
    mse = ((plain - fp8) ** 2).mean()
    assert mse > 0 and 10 * np.log10(255**2 / mse) > 25


def test_fp8_matmul_on_without_fp8_tensor_cores_is_one_error_line(ckpt, tmp_path, capsys):
    out = tmp_path / "x.mp4"
    argv = ["--ckpt-dir", str(ckpt), "--save-file", str(out), *BASE]
    assert run_cli([*argv, "--quantize", "fp8", "--fp8-matmul", "on"]) == 2
    err = capsys.readouterr().err
    assert (
        "--fp8-matmul on needs a CUDA GPU with fp8 tensor cores" in err and "--fp8-matmul auto or off" in err
    )
    assert list(tmp_path.iterdir()) == []
    assert run_cli([*argv, "--fp8-matmul", "on"]) == 2
    assert "add --quantize fp8" in capsys.readouterr().err
    assert run_cli([*argv, "--quantize", "int4"]) == 2
    assert "--quantize 'int4' is not supported" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# The fp8 matmul (GPUs with fp8 tensor cores only)
# ----------------------------------------------------------------------------------------------------

needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not scaled_mm_capable(torch.device("cuda")),
    reason="needs a CUDA GPU with compute capability >= 8.9",
)


@pytest.mark.cuda
@needs_fp8_gpu
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_scaled_mm_linear_is_close_to_the_dequantised_linear(granularity):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(512, 1024, device="cuda", generator=gen) / 32
    b = torch.randn(512, device="cuda", generator=gen).bfloat16()
    x = torch.randn(2, 77, 1024, device="cuda", generator=gen).bfloat16()
    q, scale = quantize(w, granularity)
    dequantised = Fp8Linear.from_quantized(q, scale, b, compute_dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_quantized(q, scale, b, compute_dtype=torch.bfloat16, use_scaled_mm=True)
    ref, got = dequantised(x).float(), fp8(x).float()
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()).item() < 0.05  # the activation's own fp8 rounding


@pytest.mark.cuda
@needs_fp8_gpu
def test_scaled_mm_forward_reads_nothing_back_to_the_host():
    q, scale = quantize(torch.randn(256, 512, device="cuda"))
    layer = Fp8Linear.from_quantized(q, scale, compute_dtype=torch.bfloat16, use_scaled_mm=True)
    x = torch.randn(64, 512, device="cuda").bfloat16()
    layer(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fp8_layers_lists_the_quantised_layers(folder):
    model = wan.load_transformer(folder, storage=FP8_STORAGE)
    assert len(fp8_layers(model)) == len(model.blocks) * len(BLOCK_LINEARS)
