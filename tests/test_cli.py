"""The magcache-generate command: bad inputs fail fast with one line, upstream spellings, batches, plans.

Nothing here loads weights: ``magcache_generate.run`` is replaced by a fake module that records the
requests it receives (or fails the test when bad input must never reach it).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_validate import make_image
from typer.testing import CliRunner

from magcache_generate.cli import app, main
from magcache_generate.request import Request
from wan.configs import TASKS


@pytest.fixture
def workdir(tmp_path, monkeypatch, make_checkpoint):
    """A temp folder as the current directory, with tiny checkpoints for every task."""
    monkeypatch.chdir(tmp_path)
    for task in TASKS:
        make_checkpoint(tmp_path / "ckpt" / task, task)
    make_image(tmp_path / "first.png")
    return tmp_path


@pytest.fixture
def captured(monkeypatch) -> list[Request]:
    """Requests that reached run_requests (the fake one: nothing is generated)."""
    seen: list[Request] = []
    fake = types.ModuleType("magcache_generate.run")

    def run_requests(requests, *, console, debug=False, batch=None, startup=None, magcache=None):
        seen.extend(requests)
        return [{"task": r.task} for r in requests]

    fake.run_requests = run_requests
    monkeypatch.setitem(sys.modules, "magcache_generate.run", fake)
    return seen


@pytest.fixture
def forbidden_run(monkeypatch):
    """Bad input must never reach run_requests, nor any loader or tensor read."""
    import torch

    import wan
    import wan.checkpoint_reader
    import wan.loading

    fake = types.ModuleType("magcache_generate.run")

    def run_requests(requests, *, console, debug=False, batch=None, startup=None, magcache=None):
        raise AssertionError("bad input reached run_requests")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read before every input was checked")

    fake.run_requests = run_requests
    monkeypatch.setitem(sys.modules, "magcache_generate.run", fake)
    tensor_reads = [(torch, "load"), (wan.checkpoint_reader.MappedSafetensors, "tensor")]
    for target, name in [*tensor_reads, (wan.loading, "load_transformer")]:
        monkeypatch.setattr(target, name, no_loading)
    for name in ("load_transformer", "load_text_encoder", "load_vae"):
        monkeypatch.setattr(wan, name, no_loading)


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def ckpt(task: str = "t2v-A14B") -> str:
    return f"ckpt/{task}"


# ---------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, no traceback, nothing written, nothing run


def _drop(path: str):
    def setup(root: Path) -> None:
        target = root / path
        if target.is_dir():
            for child in sorted(target.rglob("*"), reverse=True):
                child.unlink() if child.is_file() else child.rmdir()
            target.rmdir()
        else:
            target.unlink()

    return setup


def _write(path: str, data: bytes = b"old"):
    return lambda root: (
        (root / path).parent.mkdir(parents=True, exist_ok=True) or (root / path).write_bytes(data)
    )


def _truncate(path: str):
    return lambda root: (root / path).write_bytes((root / path).read_bytes()[:-200])


def _randomize(path: str):
    return lambda root: (root / path).write_bytes(random.Random(0).randbytes((root / path).stat().st_size))


def _copy(source: str, target: str):
    return lambda root: shutil.copyfile(root / source, root / target)


T2V = ["--ckpt-dir", ckpt(), "--save-file", "out.mp4"]
VAE = "ckpt/t2v-A14B/Wan2.1_VAE.pth"
T5 = "ckpt/t2v-A14B/models_t5_umt5-xxl-enc-bf16.pth"
I2V = ["--task", "i2v-A14B", "--ckpt-dir", ckpt("i2v-A14B"), "--save-file", "out.mp4"]
SHARD = "ckpt/t2v-A14B/high_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors"

BAD_INPUTS = [
    ("bad-task", ["--task", "t2v-14B", *T2V[2:]], None, "Invalid value for '--task'"),
    (
        "unsupported-size",
        [*T2V, "--size", "1280*704"],
        None,
        "--size '1280*704' is not supported by t2v-A14B",
    ),
    ("frame-80", [*T2V, "--frame-num", "80"], None, "--frame-num 80 is not of the form 4n+1"),
    ("frame-upstream-spelling", [*T2V, "--frame_num", "0"], None, "--frame-num 0 is not of the form 4n+1"),
    ("i2v-without-image", I2V, None, "i2v-A14B needs an input image; pass --image"),
    ("image-for-t2v", [*T2V, "--image", "first.png"], None, "t2v-A14B takes no --image"),
    ("missing-image-file", [*I2V, "--image", "nothere.png"], None, "--image 'nothere.png' not found"),
    (
        "non-image-file",
        [*I2V, "--image", "notes.txt"],
        _write("notes.txt", b"hello"),
        "is not a readable image",
    ),
    ("missing-ckpt-dir", ["--ckpt-dir", "nowhere"], None, "--ckpt-dir 'nowhere' not found"),
    ("no-ckpt-dir", ["--save-file", "out.mp4"], None, "--ckpt-dir is required"),
    (
        "no-low-noise-folder",
        T2V,
        _drop("ckpt/t2v-A14B/low_noise_model"),
        "incomplete for t2v-A14B: ckpt/t2v-A14B/low_noise_model: transformer checkpoint not found",
    ),
    (
        "missing-shard",
        T2V,
        _drop(SHARD),
        "shard named in diffusion_pytorch_model.safetensors.index.json is missing",
    ),
    ("missing-vae", T2V, _drop("ckpt/t2v-A14B/Wan2.1_VAE.pth"), "Wan2.1_VAE.pth (the VAE) is missing"),
    (
        "missing-t5",
        T2V,
        _drop("ckpt/t2v-A14B/models_t5_umt5-xxl-enc-bf16.pth"),
        "models_t5_umt5-xxl-enc-bf16.pth (the umT5 text encoder) is missing",
    ),
    (
        "missing-tokenizer",
        T2V,
        _drop("ckpt/t2v-A14B/google/umt5-xxl"),
        "tokenizer folder google/umt5-xxl/ with tokenizer.json or spiece.model is missing",
    ),
    ("existing-output", T2V, _write("out.mp4"), "output file 'out.mp4' already exists; pass --overwrite"),
    ("existing-sidecar", T2V, _write("out.json"), "output file 'out.json' already exists; pass --overwrite"),
    ("bad-suffix", [*T2V, "--save-file", "out.gif"], None, "--save-file 'out.gif' must end in .mp4"),
    ("negative-steps", [*T2V, "--sample-steps", "-3"], None, "--sample-steps -3 must be at least 1"),
    ("zero-shift", [*T2V, "--sample_shift", "0"], None, "--sample-shift 0.0 must be a number > 0"),
    ("three-guide-scales", [*T2V, "--sample-guide-scale", "1,2,3"], None, "must be one number or two"),
    ("bad-solver", [*T2V, "--sample-solver", "heun"], None, "Invalid value for '--sample-solver'"),
    ("bad-K", [*T2V, "--use-magcache", "--magcache-K", "0"], None, "--magcache-K 0 must be >= 1"),
    (
        "bad-thresh",
        [*T2V, "--use_magcache", "--magcache_thresh", "-0.1"],
        None,
        "--magcache-thresh -0.1 must be > 0",
    ),
    (
        "bad-retention",
        [*T2V, "--use-magcache", "--retention_ratio", "1"],
        None,
        "--retention-ratio 1.0 must be in [0, 1)",
    ),
    (
        "bad-mode",
        [*T2V, "--use-magcache", "--magcache-mode", "fast"],
        None,
        "Invalid value for '--magcache-mode'",
    ),
    (
        "calibrate-with-magcache",
        [*T2V, "--use-magcache", "--magcache-calibrate", "r.json"],
        None,
        "cannot be combined with --use-magcache",
    ),
    (
        "magcache-flag-alone",
        [*T2V, "--magcache-k", "3"],
        None,
        "--magcache-K has no effect without --use-magcache",
    ),
    (
        "missing-ratios",
        [*T2V, "--use-magcache", "--magcache-ratios", "r.json"],
        None,
        "ratios file not found",
    ),
    (
        "unknown-option",
        [*T2V, "--frame-nmu", "81"],
        None,
        "unknown option --frame-nmu; did you mean --frame-num?",
    ),
    ("unknown-upstream-spelling", [*T2V, "--frame_nmu", "81"], None, "did you mean --frame-num?"),
    ("unknown-option-far", [*T2V, "--foo"], None, "unknown option --foo; see --help for the options"),
    (
        "stray-argument",
        [*T2V, "--prompt", "a", "cat"],
        None,
        "unexpected argument 'cat' after --prompt: quote",
    ),
    ("flag-with-value", [*T2V, "--use-magcache", "yes"], None, "--use-magcache is a flag and takes no value"),
    (
        "three-guide-scales-spaced",
        [*T2V, "--sample-guide-scale", "1", "2", "3"],
        None,
        "--sample-guide-scale '1,2,3' must be one number or two",
    ),
    (
        "frames-over-limit",
        [*T2V, "--frame-num", "100001"],
        None,
        "--frame-num 100001 is over the limit of 1001",
    ),
    (
        "steps-over-limit",
        [*T2V, "--sample-steps", "100000"],
        None,
        "--sample-steps 100000 is over the limit of 1000",
    ),
    (
        "plan-steps-over-limit",
        ["--magcache-plan", "--sample-steps", "100000"],
        None,
        "--sample-steps 100000 is over the limit",
    ),
    (
        "plan-missing-image",
        ["--magcache-plan", "--task", "i2v-A14B", "--image", "nothere.png"],
        None,
        "--image 'nothere.png' not found",
    ),
    ("plan-image-for-t2v", ["--magcache-plan", "--image", "first.png"], None, "t2v-A14B takes no --image"),
    (
        "truncated-vae",
        T2V,
        _truncate(VAE),
        "'ckpt/t2v-A14B/Wan2.1_VAE.pth' (the VAE) is truncated or corrupt",
    ),
    ("random-vae", T2V, _randomize(VAE), "(the VAE) is neither a torch.save archive nor a safetensors file"),
    ("empty-vae", T2V, _write(VAE, b""), "(the VAE) is empty (0 bytes)"),
    ("t5-as-vae", T2V, _copy(T5, VAE), "Wan2.1_VAE.pth' holds the umT5 text encoder"),
    ("truncated-t5", T2V, _truncate(T5), "(the umT5 text encoder) is truncated or corrupt"),
    ("random-t5", T2V, _randomize(T5), "(the umT5 text encoder) is neither a torch.save archive"),
    ("vae-as-t5", T2V, _copy(VAE, T5), "holds a Wan2.1 VAE (Wan2.1_VAE.pth), not the umT5 text encoder"),
    ("wan22-vae-for-t2v", T2V, _copy("ckpt/ti2v-5B/Wan2.2_VAE.pth", VAE), "holds a Wan2.2 VAE, but t2v-A14B"),
    ("truncated-shard", T2V, _truncate(SHARD), "(a transformer shard) is truncated"),
    (
        "i2v-folder-for-t2v",
        ["--task", "t2v-A14B", "--ckpt-dir", ckpt("i2v-A14B")],
        None,
        "holds an i2v transformer",
    ),
    (
        "output-under-a-file",
        [*T2V, "--save-file", "first.png/out.mp4"],
        None,
        "'first.png' is a file, not a folder",
    ),
    ("not-a-number", [*T2V, "--frame-num", "many"], None, "Invalid value for '--frame-num'"),
    ("offload-word", [*T2V, "--offload_model", "maybe"], None, "--offload-model takes true or false"),
    (
        "multi-gpu",
        [*T2V, "--ulysses_size", "2"],
        None,
        "--ulysses-size needs several processes; launch with torchrun",
    ),
    (
        "fsdp-one-process",
        [*T2V, "--dit_fsdp"],
        None,
        "--dit-fsdp needs several processes; launch with torchrun",
    ),
    ("json-without-plan", [*T2V, "--json"], None, "--json only applies to --magcache-plan"),
    ("demo-and-ckpt", [*T2V, "--demo"], None, "--demo builds its own tiny checkpoint; drop --ckpt-dir"),
    (
        "prompt-and-file",
        [*T2V, "--prompt", "x", "--prompt-file", "p.txt"],
        _write("p.txt", b"a\n"),
        "exclude each other",
    ),
]


@pytest.mark.parametrize(
    ("argv", "setup", "fragment"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_fails_fast_with_one_line(workdir, forbidden_run, capsys, argv, setup, fragment):
    if setup is not None:
        setup(workdir)
    before = snapshot(workdir)
    code, out, err = run_main(argv, capsys)
    assert code == 2, err
    assert fragment in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    assert snapshot(workdir) == before  # nothing written


def test_bad_input_through_the_typer_app(workdir, forbidden_run):
    result = CliRunner().invoke(app, ["--ckpt-dir", ckpt(), "--frame-num", "80"])
    assert result.exit_code == 2
    assert "error: --frame-num 80 is not of the form 4n+1" in result.output
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(workdir, forbidden_run, capsys):
    code, _, err = run_main(["--ckpt-dir", ckpt(), "--frame-num", "80", "--debug"], capsys)
    assert code == 2
    assert "Traceback" in err and "error: --frame-num 80" in err


# ---------------------------------------------------------------------------------------------------
# Valid runs reach run_requests with the right Request


def test_upstream_spellings_give_the_same_request(workdir, captured, capsys):
    upstream = [
        "--frame_num",
        "81",
        "--offload_model",
        "True",
        "--sample_guide_scale",
        "3.0",
        "--base_seed",
        "42",
    ]
    kebab = ["--frame-num", "81", "--offload-model", "--sample-guide-scale", "3.0", "--base-seed", "42"]
    assert run_main([*upstream, "--ckpt_dir", ckpt()], capsys)[0] == 0
    assert run_main([*kebab, "--ckpt-dir", ckpt()], capsys)[0] == 0
    first, second = (dataclasses.replace(r, save_file=Path("x.mp4")) for r in captured)  # names hold the time
    assert first == second
    assert first.guide_scale == (3.0, 3.0) and first.base_seed == 42 and first.offload_model


def test_every_option_has_its_underscore_spelling():
    """Derived from the command: an option added to it is known in both spellings, value or flag."""
    import typer

    from magcache_generate.argv import command_options, normalize_argv

    options = command_options(typer.main.get_command(app))
    for name, takes_value in options.items():
        if not name.startswith("--") or "-" not in name[2:] or name == "--no-offload-model":
            continue
        underscore = "--" + name[2:].replace("-", "_")
        argv = [underscore, "3"] if takes_value else [underscore]
        expected = {"--offload-model": ["--offload-model"], "--sample-guide-scale": [f"{name}=3"]}
        assert normalize_argv(argv, options) == expected.get(name, [f"{name}=3"] if takes_value else [name])


def test_underscore_spellings_of_newer_options(workdir, captured, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a budget needs a GPU (refused early)
    argv = ["--ckpt_dir", ckpt(), "--cfg_batch", "off", "--gpu_memory", "8", "--attention", "math"]
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    assert (captured[0].cfg_batch, captured[0].gpu_memory, captured[0].attention) == ("off", 8.0, "math")


def test_typer_app_and_main_agree(workdir, captured, capsys):
    args = ["--ckpt-dir", ckpt(), "--base-seed", "1", "--save-file", "a.mp4", "--size", "832*480"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert run_main(args, capsys)[0] == 0
    assert captured[0] == captured[1]
    assert captured[0].size == "832*480" and captured[0].ckpt_dir == Path(ckpt())


def test_guide_scale_pair_and_offload_false(workdir, captured, capsys):
    argv = ["--ckpt-dir", ckpt(), "--sample-guide-scale", "3", "4", "--offload_model", "false", "--t5_cpu"]
    assert run_main(argv, capsys)[0] == 0
    (request,) = captured
    assert request.guide_scale == (3.0, 4.0)
    assert request.offload_model is False and request.t5_cpu is True


def test_magcache_flags_reach_the_request(workdir, captured, capsys):
    argv = ["--ckpt-dir", ckpt(), "--use_magcache", "--magcache_K", "3", "--magcache-mode", "official"]
    assert run_main([*argv, "--retention_ratio", "0.3", "--magcache_thresh", "0.05"], capsys)[0] == 0
    mc = captured[0].magcache
    assert (mc.enabled, mc.K, mc.mode, mc.retention_ratio, mc.thresh) == (True, 3, "official", 0.3, 0.05)


def test_random_seed_is_printed_and_default_name_is_shell_safe(workdir, captured, capsys):
    code, out, _ = run_main(["--ckpt-dir", ckpt(), "--prompt", "it's a $cat & dog; (really)"], capsys)
    assert code == 0
    (request,) = captured
    assert f"seed {request.base_seed} (random" in out
    name = str(request.save_file)
    assert name.startswith("t2v-A14B_1280x720_1_it_s_a__cat___dog___really_")
    assert all(ch.isalnum() or ch in "-_." for ch in name)


def test_ti2v_image_is_optional(workdir, captured, capsys):
    base = ["--task", "ti2v-5B", "--ckpt-dir", ckpt("ti2v-5B"), "--base-seed", "0"]
    assert run_main([*base, "--save-file", "a.mp4"], capsys)[0] == 0
    assert run_main([*base, "--save-file", "b.mp4", "--image", "first.png"], capsys)[0] == 0
    assert captured[0].image is None and captured[1].image == Path("first.png")
    assert captured[0].size == "1280*704" and captured[0].frame_num == 121


def test_unexpected_errors_exit_1_with_a_hint(workdir, monkeypatch, capsys):
    fake = types.ModuleType("magcache_generate.run")

    def boom(requests, *, console, debug=False, batch=None, startup=None, magcache=None):
        raise RuntimeError("CUDA out of memory\nmore detail")

    fake.run_requests = boom
    monkeypatch.setitem(sys.modules, "magcache_generate.run", fake)
    code, _, err = run_main(["--ckpt-dir", ckpt(), "--save-file", "a.mp4"], capsys)
    assert code == 1
    assert err.strip() == (
        "error: unexpected RuntimeError: CUDA out of memory more detail; rerun with --debug for the traceback"
    )


def test_keyboard_interrupt_exits_130(workdir, monkeypatch, capsys):
    fake = types.ModuleType("magcache_generate.run")

    def interrupted(requests, *, console, debug=False, batch=None, startup=None, magcache=None):
        raise KeyboardInterrupt

    fake.run_requests = interrupted
    monkeypatch.setitem(sys.modules, "magcache_generate.run", fake)
    code, _, err = run_main(["--ckpt-dir", ckpt(), "--save-file", "a.mp4"], capsys)
    assert code == 130
    assert err.strip() == "error: interrupted"


# ---------------------------------------------------------------------------------------------------
# Batches


def table_rows(out: str) -> list[list[str]]:
    """Rows of the closing batch table (plain columns when not a terminal): number, line, status, then
    seed, seconds and output for items that ran, or the reason for skipped ones."""
    lines = out.splitlines()
    start = lines.index("batch") + 2  # title, header
    rows = []
    for line in lines[start:]:
        if line.startswith("batch:"):
            break
        number, line_number, status, rest = line.split(None, 3)
        tail = [rest.strip()] if status == "skipped" else rest.split(None, 2)
        rows.append([number, line_number, status, *tail])
    return rows


def test_prompt_file_with_one_bad_item(workdir, captured, capsys):
    (workdir / "prompts.txt").write_text(
        "# batch\na fox in snow\n\n"
        '{"prompt": "a boat", "seed": 3, "frame_num": 17}\n'
        '{"prompt": "bad", "frame_num": 80}\n'
    )
    code, out, err = run_main(
        ["--ckpt-dir", ckpt(), "--prompt-file", "prompts.txt", "--base-seed", "9"], capsys
    )
    assert code == 3  # a batch ran, but not every item was generated
    assert [r.prompt for r in captured] == ["a fox in snow", "a boat"]
    assert [r.base_seed for r in captured] == [9, 3]
    assert captured[1].frame_num == 17
    assert str(captured[0].save_file).endswith("_001.mp4") and str(captured[1].save_file).endswith("_002.mp4")
    assert err.strip().splitlines() == [
        "skipped: prompts.txt line 5: --frame-num 80 is not of the form 4n+1 (the VAE packs 4 frames per latent); "
        "try 81"
    ]
    rows = table_rows(out)
    assert [r[:3] for r in rows] == [["001", "2", "ok"], ["002", "4", "ok"], ["003", "5", "skipped"]]
    assert rows[0][3] == "9" and rows[0][-1] == str(captured[0].save_file)
    assert rows[2][-1].startswith("--frame-num 80 is not of the form 4n+1")
    assert "batch: 3 item(s), 2 ok, 1 skipped, 0 failed; total" in out


def test_bad_json_line_keeps_the_numbering_and_the_table_complete(workdir, captured, capsys):
    (workdir / "prompts.txt").write_text('a fox\n{"prompt": "a boat",\n# note\na cat\n')
    code, out, err = run_main(["--ckpt-dir", ckpt(), "--prompt-file", "prompts.txt"], capsys)
    assert code == 3
    assert "skipped: prompts.txt line 2: not valid JSON" in err
    names = [str(r.save_file) for r in captured]
    assert names[0].endswith("_001.mp4") and names[1].endswith("_003.mp4")  # the bad line keeps number 002
    assert [r[:3] for r in table_rows(out)] == [
        ["001", "1", "ok"],
        ["002", "2", "skipped"],
        ["003", "4", "ok"],
    ]


def test_batch_exit_codes(workdir, monkeypatch, capsys):
    (workdir / "prompts.txt").write_text("a fox\na boat\n")
    fake = types.ModuleType("magcache_generate.run")
    outcome = {"fail": False}

    def run_requests(requests, *, console, debug=False, batch=None, startup=None, magcache=None):
        assert batch is True
        results = [{"task": r.task, "total_s": 1.0} for r in requests]
        if outcome["fail"]:
            results[1]["error"] = "decoder exploded"
        return results

    fake.run_requests = run_requests
    monkeypatch.setitem(sys.modules, "magcache_generate.run", fake)
    argv = ["--ckpt-dir", ckpt(), "--prompt-file", "prompts.txt", "--overwrite"]
    code, out, _ = run_main(argv, capsys)
    assert code == 0
    assert [r[2] for r in table_rows(out)] == ["ok", "ok"]
    outcome["fail"] = True
    code, out, _ = run_main(argv, capsys)
    assert code == 3
    rows = table_rows(out)
    assert [r[2] for r in rows] == ["ok", "failed"] and rows[1][-1] == "decoder exploded"
    assert "2 item(s), 1 ok, 0 skipped, 1 failed" in out


def test_single_valid_item_of_a_prompt_file_is_still_a_batch(workdir, captured, capsys):
    (workdir / "prompts.txt").write_text('a fox\n{"prompt": "x", "size": "1*1"}\n')
    code, out, _ = run_main(["--ckpt-dir", ckpt(), "--prompt-file", "prompts.txt"], capsys)
    assert code == 3 and len(captured) == 1
    assert [r[2] for r in table_rows(out)] == ["ok", "skipped"]


def test_calibration_over_a_prompt_file_needs_like_runs(workdir, captured, capsys):
    (workdir / "prompts.txt").write_text('a fox\n{"prompt": "a boat", "sample_steps": 20}\na cat\n')
    argv = ["--ckpt-dir", ckpt(), "--prompt-file", "prompts.txt", "--magcache-calibrate", "ratios.json"]
    code, _, err = run_main(argv, capsys)
    assert code == 3
    assert [r.prompt for r in captured] == ["a fox", "a cat"]
    assert all(r.magcache.calibrate_file == Path("ratios.json") for r in captured)
    assert (
        "skipped: prompts.txt line 2: sample_steps differs from line 1's; --magcache-calibrate averages"
        in err
    )


def test_calibration_file_may_not_be_an_items_output(workdir, captured, capsys):
    (workdir / "prompts.txt").write_text('a fox\n{"prompt": "a boat", "save_file": "r.mp4"}\n')
    argv = ["--ckpt-dir", ckpt(), "--prompt-file", "prompts.txt", "--magcache-calibrate", "r.json"]
    code, _, err = run_main(argv, capsys)
    assert code == 3
    assert "line 2: --magcache-calibrate 'r.json' is the video's sidecar file" in err


def test_prompt_file_without_valid_items_exits_2(workdir, forbidden_run, capsys):
    (workdir / "prompts.txt").write_text('{"prompt": "a", "frame_num": 80}\n{"oops": 1}\n')
    before = snapshot(workdir)
    code, _, err = run_main(["--ckpt-dir", ckpt(), "--prompt-file", "prompts.txt"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("skipped: prompts.txt line 1:") and lines[1].startswith(
        "skipped: prompts.txt line 2:"
    )
    assert lines[2] == "error: --prompt-file 'prompts.txt' has no valid item; fix the lines reported above"
    assert snapshot(workdir) == before


# ---------------------------------------------------------------------------------------------------
# --magcache-plan, --help, import cost


def test_magcache_plan_json(tmp_path, monkeypatch, forbidden_run, capsys):
    monkeypatch.chdir(tmp_path)  # no checkpoint anywhere: the plan needs none
    code, out, err = run_main(
        ["--magcache-plan", "--json", "--task", "t2v-A14B", "--sample_steps", "20"], capsys
    )
    assert code == 0, err
    data = json.loads(out)
    for key in ("task", "steps", "mode", "forwards", "dense_forwards", "calls", "thresh", "K", "retention"):
        assert key in data
    assert data["task"] == "t2v-A14B" and data["steps"] == 20 and data["mode"] == "aligned"
    assert len(data["calls"]) == data["dense_forwards"] == 40
    assert data["forwards"] == sum(c["computed"] for c in data["calls"])
    assert list(tmp_path.iterdir()) == []


def test_magcache_plan_text_and_bad_settings(tmp_path, monkeypatch, forbidden_run, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(["--magcache-plan", "--task", "ti2v-5B", "--magcache-speedup", "1.5"], capsys)
    assert code == 0 and "ideal speedup" in out
    code, _, err = run_main(["--magcache-plan", "--magcache-K", "0"], capsys)
    assert (
        code == 2
        and err.strip() == "error: --magcache-K 0 must be >= 1 (the most consecutive skips); upstream uses 2"
    )


def test_unreachable_speedup_fails_before_loading(workdir, forbidden_run, capsys):
    before = snapshot(workdir)
    argv = ["--ckpt-dir", ckpt(), "--use-magcache", "--magcache-speedup", "5", "--save-file", "a.mp4"]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert err.startswith("error: ideal speedup 5.0x is out of reach for t2v-A14B at 40 steps")
    assert len(err.strip().splitlines()) == 1
    assert snapshot(workdir) == before


def test_batch_item_whose_magcache_plan_fails_is_skipped(workdir, captured, capsys):
    (workdir / "prompts.txt").write_text('a fox\n{"prompt": "a boat", "sample_steps": 3}\n')
    argv = [
        "--ckpt-dir",
        ckpt(),
        "--prompt-file",
        "prompts.txt",
        "--use-magcache",
        "--magcache-speedup",
        "1.6",
    ]
    code, _, err = run_main(argv, capsys)
    assert code == 3
    assert [r.prompt for r in captured] == ["a fox"]
    assert err.startswith(
        "skipped: prompts.txt line 2: ideal speedup 1.6x is out of reach for t2v-A14B at 3 steps"
    )


def test_help_lists_the_panels_and_both_spellings_work():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0
    for panel in ("Task", "Sampling", "Memory", "Output", "MagCache", "Batch"):
        assert panel in result.output
    assert "--magcache-K" in result.output and "--offload-model" in result.output
    assert "at most 1001" in result.output and "at most 1000" in result.output  # the limits are stated


def test_help_and_import_do_not_load_torch():
    done = subprocess.run(
        [sys.executable, "-m", "magcache_generate", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--sample-guide-scale" in done.stdout
    probe = "import sys, magcache_generate.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
