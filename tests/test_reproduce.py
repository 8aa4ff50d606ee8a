"""Reproducible videos: the mp4 carries its generation settings as one JSON comment, the sidecar adds
start time, total time and absolute paths, and --settings-from (the mp4 or its sidecar) runs them again
with the options given on the command line overriding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_runs import run_cli

from magcache_generate.compare import read_frames
from magcache_generate.reproduce import (
    FORMAT,
    _comment_of,
    apply_settings,
    ffmetadata_value,
    read_settings,
)
from magcache_generate.request import UserError
from magcache_generate.validate import GenerateOptions
from magcache_generate.video_io import write_mp4

SMALL = ["--size", "832*480", "--frame-num", "1", "--sample-steps", "2", "--device", "cpu"]
PROMPT = 'a red kite; over = the #sea \\ at dawn, "quoted" — ünïcode'


def test_ffmetadata_escapes_are_read_back():
    text = ";FFMETADATA1\nmajor_brand=isom\ncomment=a\\=b\\;c\\#d\\\\e\\\nsecond line\nencoder=x\n"
    assert ffmetadata_value(text, "comment") == "a=b;c#d\\e\nsecond line"
    assert ffmetadata_value(text, "title") is None


def test_the_comment_tag_round_trips_through_the_mp4(tmp_path):
    comment = json.dumps({"format": FORMAT, "prompt": PROMPT}, ensure_ascii=False, separators=(",", ":"))
    video = write_mp4(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "a.mp4", fps=16, comment=comment)
    assert json.loads(_comment_of(video)) == {"format": FORMAT, "prompt": PROMPT}


def test_a_video_without_settings_is_refused(tmp_path):
    video = write_mp4(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "plain.mp4", fps=16)
    with pytest.raises(UserError, match="carries no generation settings"):
        read_settings(video)


def test_a_changed_lora_is_refused(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"one")
    settings = {
        "format": FORMAT,
        "loras": [{"path": str(lora), "sha256": "0" * 64, "scale": 0.5, "expert": "all"}],
    }
    with pytest.raises(UserError, match="changed since the video was made"):
        apply_settings(GenerateOptions(), settings)


def test_options_given_override_the_file():
    settings = {"format": FORMAT, "task": "ti2v-5B", "base_seed": 5, "prompt": "a", "sample_steps": 9}
    options = apply_settings(GenerateOptions(base_seed=11, sample_steps=None), settings)
    assert (options.task, options.base_seed, options.prompt, options.sample_steps) == ("ti2v-5B", 11, "a", 9)


def _frames(path: Path) -> np.ndarray:
    return read_frames(path)


def test_settings_from_runs_a_video_again(make_checkpoint, tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ckpt", "t2v-A14B")
    monkeypatch.chdir(tmp_path)
    first = ["--ckpt-dir", str(ckpt), "--prompt", PROMPT, "--base-seed", "7", "--use-magcache", *SMALL]
    assert run_cli([*first, "--save-file", "first.mp4", "--sample-guide-scale", "2.5,3.5"]) == 0

    settings = read_settings(Path("first.mp4"))
    assert settings["prompt"] == PROMPT and settings["base_seed"] == 7 and settings["task"] == "t2v-A14B"
    assert settings["use_magcache"] is True and settings["sample_guide_scale"] == "2.5,3.5"
    assert {"negative_prompt", "size", "frame_num", "sample_solver", "sample_shift", "version"} <= set(
        settings
    )
    sidecar = json.loads(Path("first.json").read_text())
    assert sidecar["settings"] == settings
    assert sidecar["total_s"] > 0 and "T" in sidecar["started_at"]
    assert (
        sidecar["paths"]["video"] == str(tmp_path / "first.mp4")
        and Path(sidecar["paths"]["ckpt_dir"]).is_absolute()
    )

    again = [
        "--settings-from",
        "first.mp4",
        "--ckpt-dir",
        str(ckpt),
        "--device",
        "cpu",
        "--save-file",
        "again.mp4",
    ]
    assert run_cli(again) == 0
    assert np.array_equal(_frames(Path("first.mp4")), _frames(Path("again.mp4")))  # same seed, same settings

    other = ["--settings-from", "first.json", "--ckpt-dir", str(ckpt), "--device", "cpu", "--base-seed", "8"]
    assert run_cli([*other, "--save-file", "other.mp4"]) == 0
    changed = read_settings(Path("other.mp4"))
    assert changed["base_seed"] == 8 and {k: v for k, v in changed.items() if k != "base_seed"} == {
        k: v for k, v in settings.items() if k != "base_seed"
    }
