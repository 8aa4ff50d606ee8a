# ruff: noqa: F811 - the fixtures imported from test_cli / test_cli_run are parameters of the tests
"""--attention and --compile through the CLI: refused before loading when they cannot run, reaching the
request, and reported in the sidecar (attention requested/actual, compile_s kept out of denoise)."""

from __future__ import annotations

import json
from functools import partial

import pytest
from test_cli import captured, ckpt, forbidden_run, run_main, snapshot, workdir  # noqa: F401 - fixtures
from test_cli_run import BASE, frames, run_cli, t2v_ckpt  # noqa: F401 - fixture

from wan.attention_backends import backend_installed

T2V = ["--ckpt-dir", ckpt(), "--save-file", "out.mp4"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--attention", "cudnn", "--device", "cpu"], "--attention cudnn runs only on CUDA, not on cpu; use"),
        (["--attention", "efficient", "--device", "cpu"], "--attention efficient runs only on CUDA"),
        (["--attention", "sage"], "Invalid value for '--attention'"),
    ],
)
def test_attention_that_cannot_run_fails_before_loading(workdir, forbidden_run, capsys, argv, fragment):
    before = snapshot(workdir)
    code, _, err = run_main([*T2V, *argv], capsys)
    assert code == 2 and fragment in err
    assert "Traceback" not in err and snapshot(workdir) == before


@pytest.mark.parametrize("backend", ["fa3", "fa2"])
def test_attention_package_not_installed_fails_before_loading(workdir, forbidden_run, capsys, backend):
    if backend_installed(backend):
        pytest.skip(f"{backend} is installed here")
    code, _, err = run_main([*T2V, "--attention", backend], capsys)
    assert code == 2 and f"--attention {backend} needs" in err and "not installed; install it" in err


def test_attention_and_compile_reach_the_request(workdir, captured, capsys):
    assert run_main([*T2V, "--attention", "math", "--compile", "--device", "cpu"], capsys)[0] == 0
    assert run_main([*T2V[:2], "--save-file", "two.mp4"], capsys)[0] == 0
    (first, second) = captured
    assert (first.attention, first.compile) == ("math", "on")
    assert (second.attention, second.compile) == ("auto", "auto")


def test_cuda_only_attention_with_auto_device_on_a_cpu_machine_fails_before_loading(
    t2v_ckpt, tmp_path, capsys
):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: auto is CUDA")
    argv = ["--ckpt-dir", str(t2v_ckpt), "--save-file", str(tmp_path / "x.mp4"), "--attention", "cudnn"]
    argv += [a for a in BASE if a not in ("--device", "cpu")]
    assert run_cli(argv) == 2
    assert "--attention cudnn runs only on CUDA, not on cpu" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sidecar_reports_attention_and_compile_time(t2v_ckpt, tmp_path, monkeypatch):
    """--compile with torch's eager backend (the wiring; inductor itself is tested in
    test_transformer_runtime): same frames as a plain run, compile time reported apart."""
    import magcache_generate.dit_runtime as dit_runtime
    from wan.modules.compile import BlockCompiler

    monkeypatch.setattr(dit_runtime, "BlockCompiler", partial(BlockCompiler, backend="eager"))
    sidecars = {}
    for name, extra in (("plain", []), ("compiled", ["--compile", "--attention", "math"])):
        out = tmp_path / f"{name}.mp4"
        argv = ["--ckpt-dir", str(t2v_ckpt), "--save-file", str(out), "--save-frames", str(tmp_path / name)]
        assert run_cli([*argv, *BASE, *extra]) == 0
        sidecars[name] = json.loads(out.with_suffix(".json").read_text())
    plain, compiled = sidecars["plain"], sidecars["compiled"]
    assert plain["attention"] == {
        "requested": "auto",
        "actual": "sdpa-flash/cpu",
        "by_site": {"self": "sdpa-flash/cpu", "cross": "sdpa-flash/cpu"},
    }
    assert plain["compile_s"] is None and "compile" not in plain["timings_s"]
    assert compiled["attention"]["requested"] == "math" and compiled["attention"]["actual"] == "sdpa-math/cpu"
    assert compiled["compile_s"] > 0 and compiled["timings_s"]["compile"] == pytest.approx(
        compiled["compile_s"]
    )
    assert compiled["request"]["compile"] == "on" and compiled["compile"]["enabled"] is True
    assert plain["compile"] == {"requested": "auto", "enabled": False, "reason": "auto: a CPU run"}
    assert (
        abs(frames(tmp_path / "plain").astype(int) - frames(tmp_path / "compiled").astype(int)) <= 1
    ).all()
