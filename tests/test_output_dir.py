"""`--output-dir DIR`: one video or a --prompt-file batch goes into DIR (created if missing, checked
before loading); default names are unchanged and a relative --save-file (or per-line save_file) goes
inside it."""

from __future__ import annotations

import json
from pathlib import Path

from cli_runs import run_cli

from magcache_generate.validate import GenerateOptions, build_request

BASE = ["--size", "832*480", "--frame-num", "1", "--sample-steps", "2", "--base-seed", "7", "--device", "cpu"]


def test_default_and_relative_names_go_under_the_folder(tmp_path):
    out = tmp_path / "videos"
    request = build_request(GenerateOptions(output_dir=out), check_checkpoint=False)
    plain = build_request(GenerateOptions(), check_checkpoint=False)
    assert request.save_file.parent == out
    assert request.save_file.name[:30] == plain.save_file.name[:30]  # the same name pattern
    named = build_request(
        GenerateOptions(output_dir=out, save_file=Path("a/clip.mp4")), check_checkpoint=False
    )
    assert named.save_file == out / "a" / "clip.mp4" and named.sidecar_file == out / "a" / "clip.json"
    absolute = tmp_path / "elsewhere.mp4"
    assert build_request(
        GenerateOptions(output_dir=out, save_file=absolute), check_checkpoint=False
    ).save_file == (absolute)
    assert not out.exists()  # created when the first output is written, not by validation


def test_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    assert run_cli(["--demo", "--output-dir", str(blocker)]) == 2
    assert "--output-dir" in capsys.readouterr().err
    assert run_cli(["--demo", "--output-dir", str(blocker / "sub")]) == 2  # cannot be created
    assert "is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_single_run_and_batch_write_into_the_folder(make_checkpoint, tmp_path, monkeypatch, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", "t2v-A14B")
    monkeypatch.chdir(tmp_path)
    assert (
        run_cli(["--ckpt-dir", str(ckpt), "--output-dir", "out/one", "--save-file", "clip.mp4", *BASE]) == 0
    )
    assert sorted(p.name for p in (tmp_path / "out" / "one").iterdir()) == ["clip.json", "clip.mp4"]
    assert "CPU run (--device cpu): denoising takes about " in capsys.readouterr().out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red kite\n{"prompt": "a blue kite", "save_file": "blue.mp4"}\n')
    argv = ["--ckpt-dir", str(ckpt), "--prompt-file", str(prompts), "--output-dir", "out/batch", *BASE]
    assert run_cli(argv) == 0
    names = sorted(p.name for p in (tmp_path / "out" / "batch").iterdir())
    assert "blue.mp4" in names and "blue.json" in names
    assert any(n.endswith("_001.mp4") for n in names)
    assert (
        json.loads((tmp_path / "out" / "batch" / "blue.json").read_text())["request"]["prompt"]
        == "a blue kite"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out", "prompts.txt"]
