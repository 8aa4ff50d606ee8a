"""--magcache-verify: a dense reference run beside the MagCache run, measured speedup and PSNR/SSIM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runs import run_cli

from magcache_generate.argv import normalize_argv
from magcache_generate.progress import magcache_caption
from magcache_generate.request import UserError
from magcache_generate.validate import GenerateOptions, build_request
from wan.testing.checkpoint import write_tiny_checkpoint

BASE = ["--size", "832*480", "--frame-num", "1", "--base-seed", "7", "--device", "cpu"]
# 10 steps with a loose threshold: the aligned t2v plan skips some calls in both experts
SKIPPING = ["--sample-steps", "10", "--use-magcache", "--magcache-thresh", "0.5"]


@pytest.fixture(scope="module")
def t2v_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "Wan2.2-T2V-A14B", "t2v-A14B", seed=3)


def test_verify_reports_measured_speedup_and_the_quality_compare_gives(t2v_ckpt, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    argv = ["--ckpt-dir", str(t2v_ckpt), "--save-file", str(out), "--magcache-verify", *SKIPPING, *BASE]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.dense.mp4", "clip.json", "clip.mp4"]

    sidecar = json.loads((tmp_path / "clip.json").read_text())
    report = sidecar["magcache"]
    verify = report["verify"]
    assert report["forwards"] < report["dense_forwards"] == 20  # something was skipped
    assert report["estimated_speedup_method"].startswith("estimate, not a measurement")
    assert report["measured_speedup"] == verify["measured_speedup"]
    assert verify["measured_speedup"] == pytest.approx(
        verify["dense_denoise_s"] / verify["magcache_denoise_s"], rel=1e-3
    )
    assert verify["fraction_of_ideal"] == pytest.approx(
        verify["measured_speedup"] / report["ideal_speedup"], rel=1e-3
    )
    assert verify["dense_file"] == str(tmp_path / "clip.dense.mp4")
    assert set(verify["dense_timings_s"]) == {"load_transformer", "denoise", "decode", "write"}
    assert verify["cpu_time"]["speedup"] > 0  # CPU runs also give the process-CPU-time ratio
    assert {"verify_warmup", "verify_dense", "verify_quality", "denoise"} <= set(sidecar["timings_s"])
    assert "measured" in printed and "estimated" in printed and "SSIM mean" in printed

    # the same figures as `magcache-generate compare` on the two saved files
    assert run_cli(["compare", str(tmp_path / "clip.dense.mp4"), str(out), "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    assert compared.pop("reference") == verify["dense_file"] and compared.pop("candidate") == str(out)
    assert compared == verify["quality_vs_dense"]
    assert compared["frames"] == 1 and 0 < compared["ssim"]["mean"] < 1


def test_verify_of_a_never_skipping_cache_finds_identical_videos(t2v_ckpt, tmp_path):
    out = tmp_path / "same.mp4"
    argv = ["--ckpt-dir", str(t2v_ckpt), "--save-file", str(out), "--use-magcache", "--magcache-verify"]
    argv += ["--magcache-thresh", "1e-12", "--sample-steps", "4", *BASE]
    assert run_cli(argv) == 0
    quality = json.loads((tmp_path / "same.json").read_text())["magcache"]["verify"]["quality_vs_dense"]
    assert quality["psnr_db"]["video"] is None  # identical: infinite PSNR
    assert quality["ssim"]["mean"] == 1.0 and quality["ssim"]["worst"] == 1.0


def test_verify_needs_use_magcache(t2v_ckpt, tmp_path, capsys):
    argv = ["--ckpt-dir", str(t2v_ckpt), "--save-file", str(tmp_path / "a.mp4"), "--magcache-verify", *BASE]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --magcache-verify compares a MagCache run with a dense one; add --use-magcache (or drop it)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_existing_dense_file_is_refused_before_loading(t2v_ckpt, tmp_path, capsys):
    dense = tmp_path / "a.dense.mp4"
    dense.write_bytes(b"precious")
    argv = [
        "--ckpt-dir",
        str(t2v_ckpt),
        "--save-file",
        str(tmp_path / "a.mp4"),
        "--magcache-verify",
        *SKIPPING,
    ]
    assert run_cli(argv + BASE) == 2
    err = capsys.readouterr().err
    assert "a.dense.mp4' already exists; pass --overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dense.mp4"] and dense.read_bytes() == b"precious"


def test_request_names_the_dense_file_and_upstream_spelling_maps(t2v_ckpt, tmp_path):
    options = GenerateOptions(
        ckpt_dir=t2v_ckpt, save_file=tmp_path / "v.mkv", use_magcache=True, magcache_verify=True, base_seed=1
    )
    request = build_request(options)
    assert request.dense_save_file == tmp_path / "v.dense.mkv" and request.magcache.verify
    plain = build_request(GenerateOptions(ckpt_dir=t2v_ckpt, save_file=tmp_path / "v.mp4", base_seed=1))
    assert plain.dense_save_file is None
    assert normalize_argv(["--use_magcache", "--magcache_verify"]) == ["--use-magcache", "--magcache-verify"]
    with pytest.raises(UserError, match="add --use-magcache"):
        build_request(GenerateOptions(ckpt_dir=t2v_ckpt, magcache_verify=True))


def test_caption_says_which_figure_is_estimated_and_which_measured():
    report = {"ideal_speedup": 1.5385, "estimated_speedup": 1.49}
    assert magcache_caption(report) == "ideal speedup 1.538x, estimated 1.490x (model, not measured)"
    report["verify"] = {
        "measured_speedup": 1.41,
        "dense_denoise_s": 10.0,
        "magcache_denoise_s": 7.09,
        "dense_file": "a.dense.mp4",
        "quality_vs_dense": {
            "psnr_db": {"video": 35.123, "worst": 33.0, "worst_frame": 4},
            "ssim": {"mean": 0.98765, "worst": 0.97, "worst_frame": 4},
        },
    }
    assert magcache_caption(report).splitlines() == [
        "ideal speedup 1.538x, estimated 1.490x (model, not measured), measured 1.410x (dense 10.00 s / "
        "MagCache 7.09 s)",
        "vs dense a.dense.mp4: PSNR 35.12 dB, worst frame 4 33.00 dB; SSIM mean 0.9877, worst frame 4 0.9700",
    ]


def test_batch_claims_the_dense_files(t2v_ckpt, tmp_path):
    from magcache_generate.batch import build_batch

    prompts = tmp_path / "p.jsonl"
    items = [
        {"prompt": "a", "save_file": str(tmp_path / "x.mp4")},
        {"prompt": "b", "save_file": str(tmp_path / "x.dense.mp4")},
    ]
    prompts.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    options = GenerateOptions(ckpt_dir=t2v_ckpt, use_magcache=True, magcache_verify=True, base_seed=1)
    batch = build_batch(options, Path(prompts))
    assert len(batch.entries) == 1 and "also written by line 1" in str(batch.problems[0])
