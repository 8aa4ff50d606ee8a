# ruff: noqa: F811 - the fixtures imported from test_cli are parameters of the tests
"""`--compile auto|on|off`: the decision (off on the CPU and for short runs, on for long CUDA runs, an
explicit mode respected), its spellings (the old bare flag included), the on-disk cache folder, and
where it is stated (--magcache-plan, the summary)."""

from __future__ import annotations

import json

import pytest
from test_cli import captured, ckpt, forbidden_run, run_main, workdir  # noqa: F401 - fixtures

from magcache_generate.compile_choice import (
    COMPILE_SECONDS,
    MEASURED_BLOCKS,
    CompileWork,
    cache_dir,
    decide_compile,
    measured_savings,
    saved_seconds_per_block,
)
from magcache_generate.progress import summary_rows

A14B_480P = 32_760  # tokens of 832x480x81
LONG = CompileWork(forwards=52, tokens=A14B_480P, blocks=40, dim=5120)  # 40 steps with MagCache
SHORT = CompileWork(forwards=4, tokens=A14B_480P, blocks=40, dim=5120)  # a 4-step CFG-free run


def test_auto_is_off_on_the_cpu_whatever_the_run():
    choice = decide_compile("auto", "cpu", [LONG])
    assert not choice.enabled and choice.reason == "auto: a CPU run"


def test_auto_is_off_for_a_short_cuda_run():
    choice = decide_compile("auto", "cuda", [SHORT])
    assert not choice.enabled
    assert (
        choice.reason.startswith("auto: 4 forwards save ~")
        and "less than ~20 s of compiling" in choice.reason
    )


def test_auto_is_on_for_a_long_cuda_run_and_says_why():
    choice = decide_compile("auto", "cuda", [LONG])
    saved = 52 * 40 * measured_savings()[0][1]
    assert choice.enabled and saved > COMPILE_SECONDS
    assert choice.text().startswith(f"on (auto: 52 forwards save ~{saved:.0f} s, repaying ~20 s of compiling")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_mode_is_respected(device):
    assert decide_compile("on", device, [SHORT]).enabled
    assert not decide_compile("off", device, [LONG]).enabled
    assert decide_compile("off", device, [LONG]).text() == "off (--compile off)"


def test_each_video_size_pays_its_own_compile():
    """Batch items of one size share the compiled graph; a second size compiles again."""
    half = CompileWork(forwards=22, tokens=A14B_480P, blocks=40, dim=5120)
    assert decide_compile("auto", "cuda", [half, half]).enabled  # 44 forwards at one size
    other = CompileWork(forwards=22, tokens=A14B_480P + 4680, blocks=40, dim=5120)
    mixed = decide_compile("auto", "cuda", [half, other])
    assert not mixed.enabled and "(2 video sizes)" in mixed.reason


def test_saving_per_block_goes_through_the_measured_points():
    for (tokens, eager, f_eager, f_compiled), (_, saved) in zip(
        MEASURED_BLOCKS, measured_savings(), strict=True
    ):
        assert saved == pytest.approx(eager * (1 - f_eager / f_compiled))
        assert saved_seconds_per_block(tokens, 5120) == pytest.approx(saved)
    sizes = [0, 10_000, 32_760, 50_000, 75_600, 120_000]
    savings = [saved_seconds_per_block(t, 5120) for t in sizes]
    assert savings[0] == 0 and savings == sorted(savings)
    assert saved_seconds_per_block(A14B_480P, 2560) == pytest.approx(savings[2] / 2)  # scales with width


def test_cache_dir_is_stable_and_overridable(tmp_path):
    home = cache_dir({})
    assert home.parts[-3:] == (".cache", "magcache-generate", "torchinductor")
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "magcache-generate" / "torchinductor"
    assert cache_dir({"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "x")}) == tmp_path / "x"


def test_compiling_uses_the_cache_dir(monkeypatch, tmp_path):
    import os

    import torch._inductor.config as inductor_config

    from magcache_generate.dit_runtime import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_FX_GRAPH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "magcache-generate" / "torchinductor")
    assert inductor_config.fx_graph_cache is True
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


T2V = ["--ckpt-dir", ckpt(), "--save-file", "out.mp4", "--device", "cpu"]


@pytest.mark.parametrize(
    ("extra", "mode"),
    [
        ([], "auto"),
        (["--compile"], "on"),  # the flag it used to be
        (["--compile", "--prompt", "x"], "on"),
        (["--compile", "off"], "off"),
        (["--compile=auto"], "auto"),
        (["--no-compile"], "off"),
        (["--compile", "true"], "on"),
    ],
)
def test_option_spellings(workdir, captured, capsys, extra, mode):
    assert run_main([*T2V, *extra], capsys)[0] == 0
    assert captured[0].compile == mode


def test_a_bad_mode_fails_before_loading(workdir, forbidden_run, capsys):
    code, _, err = run_main([*T2V, "--compile=sometimes"], capsys)
    assert code == 2 and "--compile" in err and "Traceback" not in err


def test_the_plan_states_the_decision(capsys):
    code, out, _ = run_main(
        ["--task", "t2v-A14B", "--size", "832*480", "--magcache-plan", "--use-magcache"], capsys
    )
    assert code == 0
    line = out.strip().splitlines()[-1]
    assert line.startswith("compile: on (auto: 52 forwards save ~")
    assert line.endswith("; on CUDA, off on the CPU)") and len(line) <= 100
    code, out, _ = run_main(["--task", "t2v-A14B", "--magcache-plan", "--device", "cpu"], capsys)
    assert out.strip().splitlines()[-1] == "compile: off (auto: a CPU run)"
    code, out, _ = run_main(
        ["--task", "t2v-A14B", "--magcache-plan", "--gpu-memory", "24", "--compile", "off"], capsys
    )
    assert code == 0 and out.strip().splitlines()[-1] == "compile: off (--compile off)"


def test_the_plan_json_carries_the_decision(capsys):
    argv = ["--task", "t2v-A14B", "--magcache-plan", "--json", "--distilled", "lightning", "--device", "cuda"]
    code, out, _ = run_main(argv, capsys)
    data = json.loads(out)
    assert code == 0 and data["compile"]["enabled"] is False
    assert data["compile"]["reason"].startswith("auto: 4 forwards save ~")
    assert "measured on one H100" in data["compile"]["figures_from"]


def test_the_summary_states_the_decision():
    record = {"requested": "auto", "enabled": True, "reason": "auto: 80 forwards save ~54 s, repaying ~20 s"}
    result = {
        "timings_s": {"denoise": 1.0},
        "peak_memory": {"host_rss_gib": 1.0, "gpu_allocated_gib": None},
        "compile": record,
    }
    assert ("compile", "on (auto: 80 forwards save ~54 s, repaying ~20 s)") in summary_rows(result)
