"""`magcache-generate convert SRC OUT --to fp8|bf16|fp16 [--lora] [--overwrite]`: the Comfy-Org layout
written tensor by tensor, loading back to what `--quantize fp8` (or a plain cast) gives; LoRAs baked in
equal a runtime merge; bad inputs are one error line, exit 2, nothing written; an interrupted conversion
leaves no file."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runs import run_cli
from lora_files import lowrank_factors, write_lora
from safetensors import safe_open
from single_files import comfy_dit_state, official_dit_state, write_single_file

import wan
from wan.lora import LoraSpec, build_merge
from wan.modules.fp8_linear import BLOCK_LINEARS, fp8_layers
from wan.testing.checkpoint import write_tiny_checkpoint
from wan.weight_storage import WeightStorage

FP8_STORAGE = WeightStorage(torch.float32, quantize="fp8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-A14B", "t2v-A14B", seed=3)


@pytest.fixture(scope="module")
def expert(ckpt):
    return ckpt / "high_noise_model"


def convert(src, out, *extra) -> int:
    return run_cli(["convert", str(src), str(out), *extra])


def read_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:  # the safetensors library reads what this writer wrote
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)


def block_linears(model):
    return [f"blocks.{i}.{name}" for i in range(len(model.blocks)) for name in BLOCK_LINEARS]


def test_fp8_file_has_the_comfy_layout_and_loads_as_quantize_fp8(expert, tmp_path):
    out = tmp_path / "dit_fp8.safetensors"
    assert convert(expert, out, "--to", "fp8") == 0
    tensors = read_all(out)
    official = official_dit_state(expert)
    assert tensors["scaled_fp8"].dtype == torch.float8_e4m3fn and tensors["scaled_fp8"].numel() == 0
    reference = wan.load_transformer(expert, storage=FP8_STORAGE)  # --quantize fp8, per tensor
    for name in block_linears(reference):
        assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert (
            tensors[f"{name}.scale_weight"].shape == ()
            and tensors[f"{name}.scale_weight"].dtype == torch.float32
        )
        assert tensors[f"{name}.scale_input"].item() == 1.0
    others = [k for k in official if k not in {f"{n}.weight" for n in block_linears(reference)}]
    assert all(
        tensors[k].dtype == torch.float16 and torch.equal(tensors[k], official[k].half()) for k in others
    )
    loaded = wan.load_transformer(out)
    assert len(fp8_layers(loaded)) == len(block_linears(reference))
    for name in block_linears(reference):
        got, want = loaded.get_submodule(name), reference.get_submodule(name)
        assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8)), name
        assert torch.equal(got.scale_weight, want.scale_weight), name


def test_fp8_files_load_through_the_cli_and_say_from_file(ckpt, tmp_path):
    flags = []
    for folder, flag in (("high_noise_model", "--dit-high"), ("low_noise_model", "--dit-low")):
        out = tmp_path / f"{folder}_fp8.safetensors"
        assert convert(ckpt / folder, out, "--to", "fp8") == 0
        flags += [flag, str(out)]
    video = tmp_path / "v.mp4"
    base = [
        "--size",
        "832*480",
        "--frame-num",
        "1",
        "--sample-steps",
        "2",
        "--base-seed",
        "7",
        "--device",
        "cpu",
    ]
    assert run_cli(["--ckpt-dir", str(ckpt), *flags, *base, "--save-file", str(video)]) == 0
    meta = json.loads(video.with_suffix(".json").read_text())
    assert meta["precision"]["dit_block_linears"].startswith("fp8 (from file)")


@pytest.mark.parametrize("to", ["bf16", "fp16"])
def test_bf16_and_fp16_round_trip(expert, tmp_path, to):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[to]
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert convert(expert, first, "--to", to) == 0
    assert convert(first, second, "--to", to) == 0  # a converted file converts to itself
    a, b = read_all(first), read_all(second)
    official = official_dit_state(expert)
    assert set(a) == set(b) == set(official)
    for key, value in official.items():
        assert (
            a[key].dtype == dtype and torch.equal(a[key], value.to(dtype)) and torch.equal(b[key], a[key])
        ), key
    loaded = wan.load_transformer(first).state_dict()
    assert all(torch.equal(loaded[k], official[k].to(dtype).float()) for k in official)


def test_an_fp8_file_converts_to_fp8_keeping_its_bytes(expert, tmp_path):
    state = comfy_dit_state(official_dit_state(expert), "fp8_scaled", prefix="model.diffusion_model.")
    src = write_single_file(tmp_path / "comfy.safetensors", state, config_from=expert)
    out = tmp_path / "again.safetensors"
    assert convert(src, out, "--to", "fp8") == 0
    tensors = read_all(out)
    for key, value in tensors.items():
        if value.dtype == torch.float8_e4m3fn and value.numel():
            stored = state[f"model.diffusion_model.{key}"]
            assert torch.equal(value.view(torch.uint8), stored.view(torch.uint8)), key
            scale = state[f"model.diffusion_model.{key.removesuffix('.weight')}.scale_weight"]
            assert torch.equal(tensors[key.removesuffix(".weight") + ".scale_weight"], scale), key


@pytest.mark.parametrize("to", ["fp8", "bf16"])
def test_a_baked_lora_equals_the_runtime_merge(expert, tmp_path, to):
    shapes = {k: tuple(v.shape) for k, v in official_dit_state(expert).items()}
    lora = write_lora(tmp_path / "l.safetensors", lowrank_factors(shapes, ["self_attn.q", "ffn.2"], seed=2))
    out = tmp_path / "baked.safetensors"
    assert convert(expert, out, "--to", to, "--lora", f"{lora}:0.8") == 0
    merge = build_merge(expert, [LoraSpec(lora, 0.8)])
    if to == "fp8":
        runtime = wan.load_transformer(expert, storage=FP8_STORAGE, transform=merge)
        baked = wan.load_transformer(out)
        for name in block_linears(runtime):
            got, want = baked.get_submodule(name), runtime.get_submodule(name)
            assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8)), name
            assert torch.equal(got.scale_weight, want.scale_weight), name
    else:
        runtime = wan.load_transformer(expert, transform=merge).state_dict()
        baked = read_all(out)
        assert all(torch.equal(baked[k], runtime[k].to(torch.bfloat16)) for k in runtime)
    with safe_open(str(out), "pt") as f:
        assert "l.safetensors:0.8" in f.metadata()["loras"]


def test_an_existing_out_is_refused_without_overwrite(expert, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert convert(expert, out, "--to", "fp16") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert convert(expert, out, "--to", "fp16", "--overwrite") == 0
    assert set(read_all(out)) == set(official_dit_state(expert))


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_conversion_leaves_no_file(expert, tmp_path, monkeypatch, failure):
    import wan.conversion

    real = wan.conversion.converted
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise failure("stopped")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(wan.conversion, "converted", failing)
    out = tmp_path / "out" / "o.safetensors"
    assert convert(expert, out, "--to", "fp8") not in (0, None)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_bad_inputs_are_one_error_line_and_nothing_is_written(ckpt, expert, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    t5 = ckpt / "models_t5_umt5-xxl-enc-bf16.pth"
    cases = [
        ((expert, out, "--to", "int4"), "--to 'int4' is not one of fp8, bf16, fp16"),
        ((tmp_path / "missing", out, "--to", "fp8"), "not found"),
        ((ckpt, out, "--to", "fp8"), "holds two experts"),
        ((expert, tmp_path / "o.bin", "--to", "fp8"), "must end in .safetensors"),
        ((t5, out, "--to", "fp8"), "SRC"),
        ((expert, out, "--to", "fp8", "--lora", str(tmp_path / "none.safetensors")), "--lora"),
    ]
    broken = dict(official_dit_state(expert))
    del broken["blocks.1.ffn.2.weight"]
    partial = write_single_file(tmp_path / "in" / "partial.safetensors", broken, config_from=expert)
    wrong_shape = write_lora(
        tmp_path / "in" / "wide.safetensors", {"blocks.0.self_attn.q": (torch.ones(4, 7), torch.ones(7, 4))}
    )
    cases += [
        ((partial, out, "--to", "fp8"), "'blocks.1.ffn.2.weight' is missing"),
        ((expert, out, "--to", "fp8", "--lora", str(wrong_shape)), "wide.safetensors"),
    ]
    for args, message in cases:
        assert convert(*args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_ti2v_folder_converts_and_loads(tmp_path_factory, tmp_path):
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("ti2v") / "Wan2.2-TI2V-5B", "ti2v-5B", seed=3)
    out = tmp_path / "ti2v_fp8.safetensors"
    assert convert(folder, out, "--to", "fp8") == 0
    reference = wan.load_transformer(folder, storage=FP8_STORAGE)
    loaded = wan.load_transformer(out)
    assert loaded.config.model_type == "ti2v"
    for name in block_linears(reference):
        got, want = loaded.get_submodule(name), reference.get_submodule(name)
        assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8)), name
