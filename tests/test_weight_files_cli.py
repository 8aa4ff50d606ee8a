"""--dit-high / --dit-low / --t5 / --vae / --tokenizer through the CLI: Comfy-style single files (prefixed
scaled float8, float16, Hugging Face T5 names, VAE safetensors), with no --ckpt-dir, give the same frames
as an official folder holding the same values; every wrong file is one `error:` line, exit 2, nothing
written, found from the headers before any weight loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import FAST_A14B as FAST
from cli_runs import frames
from safetensors.torch import load_file, save_file
from single_files import (
    PREFIX,
    comfy_dit_state,
    hf_t5_state,
    loaded_values,
    official_dit_state,
    write_single_file,
)

from magcache_generate.argv import normalize_argv
from magcache_generate.cli import main
from wan.loading import read_transformer_config
from wan.testing.checkpoint import TOKENIZER_VOCAB, write_tiny_checkpoint
from wan.testing.dit import write_transformer_folder
from wan.testing.text import train_tiny_sentencepiece

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    """Comfy-style files for every part of a tiny t2v-A14B checkpoint, and an official folder holding the
    values they load to."""
    root = tmp_path_factory.mktemp("weights")
    ckpt = write_tiny_checkpoint(root / "official", "t2v-A14B", seed=3)
    same = root / "same-values"
    shutil.copytree(ckpt, same)
    files: dict[str, Path] = {"ckpt": ckpt, "same": same}
    for expert, folder, fmt, prefix in (
        ("high", "high_noise_model", "fp8_scaled", PREFIX),
        ("low", "low_noise_model", "fp16", ""),
    ):
        file_state = comfy_dit_state(official_dit_state(ckpt / folder), fmt, prefix=prefix)
        name = f"wan2.2_t2v_{expert}_noise_14B_{fmt}.safetensors"
        files[expert] = write_single_file(root / expert / name, file_state, config_from=ckpt / folder)
        shutil.rmtree(same / folder)
        config = read_transformer_config(ckpt / folder)
        write_transformer_folder(
            same / folder, config, state=loaded_values(file_state, prefix=prefix), shards=2
        )
    files["t5"] = root / "umt5_xxl_bf16.safetensors"
    save_file(hf_t5_state(torch.load(ckpt / T5_FILE, weights_only=True)), str(files["t5"]))
    files["vae"] = root / "wan_2.1_vae.safetensors"
    vae = torch.load(ckpt / "Wan2.1_VAE.pth", weights_only=True)
    save_file({k: v.contiguous() for k, v in vae.items()}, str(files["vae"]))
    files["tokenizer"] = ckpt / "google" / "umt5-xxl"
    return files


def part_flags(parts: dict[str, Path], **override: Path) -> list[str]:
    chosen = {k: parts[k] for k in ("high", "low", "t5", "vae", "tokenizer")} | override
    flags = {
        "high": "--dit-high",
        "low": "--dit-low",
        "t5": "--t5",
        "vae": "--vae",
        "tokenizer": "--tokenizer",
    }
    return [arg for key, path in chosen.items() for arg in (flags[key], str(path))]


def run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def test_single_files_give_the_frames_of_an_official_folder_with_the_same_values(parts, tmp_path, capsys):
    reference = ["--ckpt-dir", str(parts["same"]), "--save-file", str(tmp_path / "ref.mp4")]
    code, err = run([*reference, "--save-frames", str(tmp_path / "ref"), *FAST], capsys)
    assert code == 0, err
    singles = [*part_flags(parts), "--save-file", str(tmp_path / "files.mp4")]  # no --ckpt-dir
    code, err = run([*singles, "--save-frames", str(tmp_path / "files"), *FAST], capsys)
    assert code == 0, err
    assert np.array_equal(frames(tmp_path / "files"), frames(tmp_path / "ref"))


def test_a_t5_file_that_embeds_its_tokenizer_needs_no_tokenizer_folder(parts, tmp_path, capsys):
    """ComfyUI's umT5 files carry the sentencepiece model as a `spiece_model` byte tensor: with it, neither
    --tokenizer nor --ckpt-dir is needed, and the ids (so the frames) are those of the tokenizer folder."""
    t5 = tmp_path / "umt5_xxl_with_tokenizer.safetensors"
    proto = train_tiny_sentencepiece(TOKENIZER_VOCAB)  # the model the tiny folder's tokenizer was built from
    save_file(
        {
            **load_file(str(parts["t5"])),
            "spiece_model": torch.frombuffer(bytearray(proto), dtype=torch.uint8),
        },
        str(t5),
    )
    reference = [
        *part_flags(parts),
        "--save-file",
        str(tmp_path / "ref.mp4"),
        "--save-frames",
        str(tmp_path / "ref"),
    ]
    code, err = run([*reference, *FAST], capsys)
    assert code == 0, err
    argv = part_flags(parts, t5=t5)[:-2]  # no --tokenizer, no --ckpt-dir
    code, err = run(
        [*argv, "--save-file", str(tmp_path / "x.mp4"), "--save-frames", str(tmp_path / "x"), *FAST], capsys
    )
    assert code == 0, err
    assert np.array_equal(frames(tmp_path / "x"), frames(tmp_path / "ref"))
    given = json.loads((tmp_path / "x.json").read_text())["paths"]["weight_files"]
    assert given["--t5 (its embedded tokenizer)"] == str(t5.resolve())


def test_one_part_overrides_the_checkpoint_folder(parts, tmp_path, capsys):
    """--ckpt-dir for everything but the T5, which comes from its Hugging Face-named file (same values)."""
    base = ["--save-frames", str(tmp_path / "a"), "--save-file", str(tmp_path / "a.mp4"), *FAST]
    code, err = run(["--ckpt-dir", str(parts["ckpt"]), *base], capsys)
    assert code == 0, err
    other = ["--save-frames", str(tmp_path / "b"), "--save-file", str(tmp_path / "b.mp4"), *FAST]
    code, err = run(["--ckpt-dir", str(parts["ckpt"]), "--t5", str(parts["t5"]), *other], capsys)
    assert code == 0, err
    assert np.array_equal(frames(tmp_path / "a"), frames(tmp_path / "b"))
    # the sidecar names where each part came from: the folder, and the file given by its own flag
    paths = json.loads((tmp_path / "b.json").read_text())["paths"]
    assert paths["ckpt_dir"] == str(parts["ckpt"].resolve())
    assert paths["weight_files"] == {"--t5": str(parts["t5"].resolve())}
    assert json.loads((tmp_path / "a.json").read_text())["paths"]["weight_files"] == {}


def test_upstream_underscore_spellings_reach_the_part_flags():
    argv = ["--dit_high", "h.safetensors", "--dit_low", "l.safetensors", "--ckpt_dir", "c"]
    assert normalize_argv(argv) == ["--dit-high=h.safetensors", "--dit-low=l.safetensors", "--ckpt-dir=c"]


@pytest.fixture(scope="module")
def wrong_files(parts, tiny_checkpoint_source, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wrong")
    ti2v = tiny_checkpoint_source("ti2v-5B")
    five_b = write_single_file(
        root / "wan2.2_ti2v_5B_fp16.safetensors", comfy_dit_state(official_dit_state(ti2v), "fp16")
    )
    truncated = root / "truncated.safetensors"
    truncated.write_bytes(parts["high"].read_bytes()[:-1000])
    return {
        "5b": five_b,
        "truncated": truncated,
        "vae22": ti2v / "Wan2.2_VAE.pth",
        "ti2v_tokenizer_file": ti2v / "config.json",
    }


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        (
            "t5-as-dit",
            "holds the umT5 text encoder (Hugging Face key names), not a Wan transformer; pass a t2v-A14B transformer file as --dit-high",
        ),
        ("5b-as-expert", "holds a ti2v transformer (48 input channels), but t2v-A14B needs the t2v one (16)"),
        ("truncated", "truncated"),
        ("vae-as-t5", "not the umT5 text encoder; pass the umT5-XXL encoder file as --t5"),
        ("wan22-vae", "holds a Wan2.2 VAE, but t2v-A14B needs the Wan2.1 VAE as --vae"),
        ("dit-for-a14b", "--dit is for ti2v-5B; t2v-A14B has two experts"),
        ("missing-part", "--ckpt-dir is required"),
        ("tokenizer-file", "--tokenizer"),
        ("missing-file", "--dit-low 'nowhere.safetensors' not found"),
    ],
)
def test_a_wrong_part_is_one_error_line_and_nothing_is_written(
    parts, wrong_files, tmp_path, capsys, case, fragment
):
    override = {
        "t5-as-dit": {"high": parts["t5"]},
        "5b-as-expert": {"low": wrong_files["5b"]},
        "truncated": {"high": wrong_files["truncated"]},
        "vae-as-t5": {"t5": parts["vae"]},
        "wan22-vae": {"vae": wrong_files["vae22"]},
        "tokenizer-file": {"tokenizer": wrong_files["ti2v_tokenizer_file"]},
        "missing-file": {"low": Path("nowhere.safetensors")},
    }.get(case, {})
    argv = part_flags(parts, **override)
    if case == "dit-for-a14b":
        argv += ["--dit", str(parts["high"])]
    if case == "missing-part":
        argv = argv[:-2]  # no --tokenizer, no --ckpt-dir
    out = tmp_path / "out"
    code, err = run(
        [*argv, "--save-file", str(out / "x.mp4"), "--save-frames", str(out / "frames"), *FAST], capsys
    )
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not out.exists()


def test_a_ti2v_single_file_passes_every_pre_load_check(tiny_checkpoint_source, tmp_path):
    from magcache_generate.preflight import check_before_loading
    from magcache_generate.weight_paths import PartOptions, resolve_weight_paths
    from wan.configs import TASKS

    ti2v = tiny_checkpoint_source("ti2v-5B")
    dit = write_single_file(
        tmp_path / "wan2.2_ti2v_5B_fp16.safetensors",
        comfy_dit_state(official_dit_state(ti2v), "fp16", prefix=PREFIX),
    )
    vae = tmp_path / "wan2.2_vae.safetensors"
    save_file(
        {k: v.contiguous() for k, v in torch.load(ti2v / "Wan2.2_VAE.pth", weights_only=True).items()},
        str(vae),
    )
    parts = PartOptions(dit=dit, t5=ti2v / T5_FILE, vae=vae, tokenizer=ti2v / "google" / "umt5-xxl")
    weights = check_before_loading(
        resolve_weight_paths(None, parts, TASKS["ti2v-5B"]), TASKS["ti2v-5B"], "cpu"
    )
    assert weights.root is None and weights.dits == {"": dit} and weights.flag("dit:") == "--dit"
    with pytest.raises(Exception, match="--dit-high is for the A14B tasks"):
        resolve_weight_paths(None, PartOptions(dit_high=dit), TASKS["ti2v-5B"])
