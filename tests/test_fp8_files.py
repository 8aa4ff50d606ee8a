"""fp8 DiT files stay fp8: a file whose block Linears are float8_e4m3fn loads them as `Fp8Linear`s
holding exactly the file's bytes and scales (scale 1 for a file without scales), its other float8
tensors dequantised; the model computes what the dequantised weights compute; LoRAs merge through
dequantise -> float32 -> requantise; streamed blocks equal resident ones."""

from __future__ import annotations

import pytest
import torch
from lora_files import lowrank_factors, write_lora
from single_files import FP8, PREFIX, comfy_dit_state, loaded_values, official_dit_state, write_single_file

import wan
from wan.fp8 import dequantize, quantize
from wan.loading import read_transformer_config
from wan.lora import LoraSpec, build_merge
from wan.modules.fp8_linear import BLOCK_LINEARS, Fp8Linear, fp8_layers
from wan.placement import Placement, streamed_source
from wan.testing.dit import write_transformer_folder
from wan.weight_storage import WeightStorage

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_source):
    return tiny_checkpoint_source("t2v-A14B") / "high_noise_model"


@pytest.fixture(scope="module")
def state(ckpt) -> dict[str, torch.Tensor]:
    return official_dit_state(ckpt)


def fp8_file(tmp_path, ckpt, state, fmt: str, prefix: str = ""):
    file_state = comfy_dit_state(state, fmt, prefix=prefix)
    return write_single_file(tmp_path / f"{fmt}.safetensors", file_state, config_from=ckpt), file_state


def same_values_folder(tmp_path, ckpt, file_state, prefix: str = ""):
    """An official folder holding the float32 values the file dequantises to."""
    return write_transformer_folder(
        tmp_path / "same", read_transformer_config(ckpt), state=loaded_values(file_state, prefix=prefix)
    )


def forward(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(1, cfg.in_dim, 3, 8, 8, generator=gen)
    context = [torch.randn(7, cfg.text_dim, generator=gen)]
    with torch.inference_mode():
        out = model(x, torch.tensor([731]), context)
    return out[0] if isinstance(out, list) else out


@pytest.mark.parametrize(
    ("fmt", "prefix", "granularity"),
    [
        ("fp8_scaled", PREFIX, "tensor"),
        ("fp8_scaled", "", "tensor"),
        ("fp8_rowwise", "", "row"),
        ("fp8", "", "tensor"),
    ],
)
def test_block_linears_hold_the_files_bytes_and_scales(tmp_path, ckpt, state, fmt, prefix, granularity):
    path, file_state = fp8_file(tmp_path, ckpt, state, fmt, prefix)
    model = wan.load_transformer(path, dtype=torch.float32)
    layers = fp8_layers(model)
    assert len(layers) == len(model.blocks) * len(BLOCK_LINEARS)
    for index in range(len(model.blocks)):
        for name in BLOCK_LINEARS:
            key = f"blocks.{index}.{name}"
            layer = model.get_submodule(key)
            assert isinstance(layer, Fp8Linear)
            stored = file_state[f"{prefix}{key}.weight"]
            assert torch.equal(layer.weight.view(torch.uint8), stored.view(torch.uint8)), key  # bytes kept
            scale = file_state.get(
                f"{prefix}{key}.scale_weight", file_state.get(f"{prefix}{key}.weight_scale")
            )
            expected = torch.ones(()) if scale is None else scale.float()
            assert layer.scale_weight.numel() == (1 if granularity == "tensor" else stored.shape[0])
            assert torch.equal(layer.scale_weight.reshape(-1), expected.reshape(-1)), key
            assert layer.bias.dtype == torch.float32
    # the other float8 Linears (text/time embeddings, projection, head) are dequantised to the run dtype
    values = loaded_values(file_state, prefix=prefix)
    for key in ("text_embedding.0.weight", "time_projection.1.weight", "head.head.weight"):
        tensor = model.state_dict()[key]
        assert tensor.dtype == torch.float32 and torch.equal(tensor, values[key]), key


def test_a_bf16_run_keeps_the_bytes_and_dequantises_the_rest_to_bf16(tmp_path, ckpt, state):
    path, file_state = fp8_file(tmp_path, ckpt, state, "fp8_scaled")
    model = wan.load_transformer(path, dtype=torch.bfloat16)
    layer = model.get_submodule("blocks.1.ffn.0")
    assert torch.equal(layer.weight.view(torch.uint8), file_state["blocks.1.ffn.0.weight"].view(torch.uint8))
    assert layer.compute_dtype == torch.bfloat16 and layer.scale_weight.dtype == torch.float32
    head = model.state_dict()["head.head.weight"]
    expected = file_state["head.head.weight"].float() * file_state["head.head.scale_weight"]
    assert torch.equal(head.float(), expected.to(torch.bfloat16).float())


@pytest.mark.parametrize("fmt", ["fp8_scaled", "fp8_rowwise", "fp8"])
def test_outputs_equal_the_dequantised_weights_outputs(tmp_path, ckpt, state, fmt):
    """On a float32 run the fp8 Linear dequantises to exactly the float32 values a folder holding the
    dequantised weights has, so the outputs agree bit for bit (the same math)."""
    path, file_state = fp8_file(tmp_path, ckpt, state, fmt)
    fp8_model = wan.load_transformer(path)
    dense = wan.load_transformer(same_values_folder(tmp_path, ckpt, file_state))
    assert not fp8_layers(dense)
    assert torch.equal(forward(fp8_model), forward(dense))


def test_streamed_fp8_file_blocks_equal_resident_ones(tmp_path, ckpt, state):
    path, _ = fp8_file(tmp_path, ckpt, state, "fp8_rowwise")
    resident = wan.load_transformer(path)
    streamed = wan.load_transformer(path, placement=Placement(CPU, resident_blocks=1, pin=False))
    source = streamed_source(streamed)
    assert source is not None and FP8 in {flat.dtype for flat in source.host[1].flats}  # fp8 bytes stream
    for seed in range(2):
        assert torch.equal(forward(streamed, seed), forward(resident, seed))


def test_lora_on_an_fp8_file_merges_through_dequantise_float32_requantise(tmp_path, ckpt, state):
    path, file_state = fp8_file(tmp_path, ckpt, state, "fp8_scaled", PREFIX)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    factors = lowrank_factors(shapes, ["self_attn.q", "ffn.2"], seed=5)
    lora = write_lora(tmp_path / "l.safetensors", factors)
    model = wan.load_transformer(path, transform=build_merge(path, [LoraSpec(lora, 0.7)]))
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        down, up = factors[module]
        weight, scale = file_state[f"{PREFIX}{module}.weight"], file_state[f"{PREFIX}{module}.scale_weight"]
        expected, expected_scale = quantize(dequantize(weight, scale) + 0.7 * up @ down)
        layer = model.get_submodule(module)
        assert torch.equal(layer.weight.view(torch.uint8), expected.view(torch.uint8)), module
        assert torch.allclose(layer.scale_weight, expected_scale.reshape(()))
    untouched = model.get_submodule("blocks.0.cross_attn.k")
    stored = file_state[f"{PREFIX}blocks.0.cross_attn.k.weight"]
    assert torch.equal(untouched.weight.view(torch.uint8), stored.view(torch.uint8))


def test_quantize_fp8_on_an_fp8_file_keeps_the_files_bytes(tmp_path, ckpt, state):
    path, file_state = fp8_file(tmp_path, ckpt, state, "fp8_rowwise")
    storage = WeightStorage(torch.float32, quantize="fp8")  # per-tensor asked; the file's per-row kept
    model = wan.load_transformer(path, storage=storage)
    layer = model.get_submodule("blocks.0.self_attn.v")
    assert torch.equal(
        layer.weight.view(torch.uint8), file_state["blocks.0.self_attn.v.weight"].view(torch.uint8)
    )
    assert layer.scale_weight.shape == (layer.out_features, 1)


def test_precision_says_from_file():
    storage = WeightStorage.for_run(torch.float32, CPU, "fp8").keeping_file_fp8("tensor")
    assert storage.precision()["dit_block_linears"].startswith(
        "fp8 (from file): fp8 e4m3 weights, per-tensor"
    )
    assert "fp8 (from file)" in storage.describe()


def test_cli_run_on_fp8_files_gives_the_dequantised_frames_and_says_from_file(tmp_path, capsys):
    import json
    import shutil

    import numpy as np
    from cli_runs import SMALL_A14B, frames, run_cli

    from wan.testing.checkpoint import write_tiny_checkpoint

    official = write_tiny_checkpoint(tmp_path / "official", "t2v-A14B", seed=3)
    same = tmp_path / "same"
    shutil.copytree(official, same)
    flags = []
    for folder, flag in (("high_noise_model", "--dit-high"), ("low_noise_model", "--dit-low")):
        file_state = comfy_dit_state(official_dit_state(official / folder), "fp8_scaled", prefix=PREFIX)
        path = write_single_file(
            tmp_path / folder / "dit.safetensors", file_state, config_from=official / folder
        )
        flags += [flag, str(path)]
        shutil.rmtree(same / folder)
        config = read_transformer_config(official / folder)
        write_transformer_folder(same / folder, config, state=loaded_values(file_state, prefix=PREFIX))
    base = SMALL_A14B
    runs = {}
    for name, extra in (
        ("files", ["--ckpt-dir", str(official), *flags]),
        ("dense", ["--ckpt-dir", str(same)]),
    ):
        out = tmp_path / f"{name}.mp4"
        assert run_cli([*extra, *base, "--save-file", str(out), "--save-frames", str(tmp_path / name)]) == 0
        runs[name] = json.loads(out.with_suffix(".json").read_text())
    assert np.array_equal(frames(tmp_path / "files"), frames(tmp_path / "dense"))
    assert runs["files"]["precision"]["dit_block_linears"].startswith("fp8 (from file)")
    assert runs["dense"]["precision"]["dit_block_linears"] == "fp32 weights, fp32 compute"
    # fp8 files count as fp8 weights for --fp8-matmul: `on` asks for the GPU, not for --quantize fp8
    out = tmp_path / "on.mp4"
    assert (
        run_cli(["--ckpt-dir", str(official), *flags, *base, "--save-file", str(out), "--fp8-matmul", "on"])
        == 2
    )
    assert not out.exists() and "needs a CUDA GPU with fp8 tensor cores" in capsys.readouterr().err


def test_the_run_sees_fp8_files_from_their_headers(tmp_path, ckpt, state):
    from magcache_generate.weight_paths import WeightPaths

    scaled, _ = fp8_file(tmp_path, ckpt, state, "fp8_scaled", PREFIX)
    rowwise, _ = fp8_file(tmp_path, ckpt, state, "fp8_rowwise")
    dense, _ = fp8_file(tmp_path, ckpt, state, "fp16")

    def paths(high, low):
        return WeightPaths({"high_noise_model": high, "low_noise_model": low}, tmp_path, tmp_path, tmp_path)

    assert paths(scaled, scaled).dit_fp8 == "tensor"
    assert paths(scaled, rowwise).dit_fp8 == "row"
    assert paths(scaled, dense).dit_fp8 is None  # a dense expert: the plan counts bf16 blocks
    assert paths(ckpt, ckpt).dit_fp8 is None


def test_the_planner_counts_per_row_scales():
    from wan.configs import TASKS
    from wan.memory_costs import MemoryRequest, block_bytes
    from wan.testing.dit import tiny_transformer_config

    dit = tiny_transformer_config("t2v", dim=5120, ffn_dim=13824)
    args = (TASKS["t2v-A14B"], dit, 832, 480, 81, 8 * 2**30)
    tensor = MemoryRequest(*args, weight_bytes=4, autocast_linear_bytes=2, fp8_linears=True)
    row = MemoryRequest(*args, weight_bytes=4, autocast_linear_bytes=2, fp8_linears=True, fp8_row_scales=True)
    assert block_bytes(row) - block_bytes(tensor) == 4 * (9 * 5120 + 13824 - 10)
