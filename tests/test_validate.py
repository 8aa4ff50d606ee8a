"""Request building and validation, argv normalisation and prompt files: no weights, no torch models.

``make_checkpoint`` (a conftest fixture) copies a complete tiny checkpoint: validation reads every
weight file's header or pickle, so the files must be real.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shlex
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from magcache_generate.argv import check_option_names, normalize_argv
from magcache_generate.batch import build_batch, parse_prompt_file
from magcache_generate.preflight import check_checkpoint_dir, check_image
from magcache_generate.request import UserError
from magcache_generate.validate import (
    CATS_PROMPT,
    EXAMPLE_PROMPTS,
    MAX_FRAME_NUM,
    MAX_SAMPLE_STEPS,
    GenerateOptions,
    build_request,
    check_limits,
    plan_settings,
    resolve_guide_scale,
)
from wan.configs import TASKS

NOW = datetime(2025, 7, 28, 12, 34, 56)


def make_image(path: Path) -> Path:
    Image.new("RGB", (8, 6), (200, 30, 30)).save(path)
    return path


def options(tmp_path: Path, **changes) -> GenerateOptions:
    """Valid t2v options writing into tmp_path, changed by ``changes``."""
    base = GenerateOptions(save_file=tmp_path / "out.mp4", base_seed=7)
    return dataclasses.replace(base, **changes)


def build(tmp_path: Path, **changes):
    return build_request(options(tmp_path, **changes), now=NOW, check_checkpoint=False)


def refused(tmp_path: Path, fragment: str, **changes) -> str:
    with pytest.raises(UserError) as info:
        build(tmp_path, **changes)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------
# Defaults


@pytest.mark.parametrize("task", list(TASKS))
def test_task_defaults_match_the_config(tmp_path, task):
    cfg = TASKS[task]
    image = make_image(tmp_path / "first.png") if cfg.image == "required" else None
    request = build(tmp_path, task=task, image=image)
    assert request.size == cfg.default_size
    assert request.frame_num == cfg.frame_num
    assert request.sample_steps == cfg.sample_steps
    assert request.sample_shift == cfg.sample_shift
    assert request.guide_scale == cfg.guide_scale
    assert request.prompt == EXAMPLE_PROMPTS[task]
    assert request.negative_prompt is None  # the official one
    assert request.offload_model is True  # upstream's single-device default
    assert request.sample_solver == "unipc"
    assert request.crf == 10
    assert request.magcache.enabled is False


def test_t2v_and_ti2v_share_upstreams_example_prompt():
    assert EXAMPLE_PROMPTS["t2v-A14B"] == EXAMPLE_PROMPTS["ti2v-5B"] == CATS_PROMPT
    assert CATS_PROMPT.startswith("Two anthropomorphic cats in comfy boxing gear")


def test_size_accepts_x_spelling(tmp_path):
    assert build(tmp_path, size="832x480").size == "832*480"


def test_empty_negative_prompt_means_the_official_one(tmp_path):
    assert build(tmp_path, negative_prompt="").negative_prompt is None
    assert build(tmp_path, negative_prompt="blurry").negative_prompt == "blurry"


def test_random_seed_is_drawn_in_upstreams_range(tmp_path):
    request = build_request(
        options(tmp_path, base_seed=-1), now=NOW, check_checkpoint=False, rng=random.Random(0)
    )
    assert request.base_seed == random.Random(0).randint(0, 2**63 - 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", (3.0, 3.0)),
        ("3.0,4.0", (3.0, 4.0)),
        ("3 4", (3.0, 4.0)),
        (2.5, (2.5, 2.5)),
        ((1, 2), (1.0, 2.0)),
    ],
)
def test_guide_scale_forms(value, expected):
    assert resolve_guide_scale(value, TASKS["t2v-A14B"]) == expected


def test_guide_scale_pair_is_refused_for_the_single_model_task():
    with pytest.raises(UserError, match="ti2v-5B has one model"):
        resolve_guide_scale("3,4", TASKS["ti2v-5B"])


def test_default_save_file_is_shell_safe_and_batch_items_differ(tmp_path):
    prompt = 'A cat\'s "dream"; rm -rf * & echo $HOME | `id` (v2)/<x>?\nnext'
    first = build_request(
        options(tmp_path, save_file=None, prompt=prompt), now=NOW, item_index=1, check_checkpoint=False
    )
    second = build_request(
        options(tmp_path, save_file=None, prompt=prompt), now=NOW, item_index=2, check_checkpoint=False
    )
    single = build_request(options(tmp_path, save_file=None, prompt=prompt), now=NOW, check_checkpoint=False)
    for request in (first, second, single):
        name = str(request.save_file)
        assert shlex.quote(name) == name, name
        assert name.startswith("t2v-A14B_1280x720_1_A_cat")
        assert name.endswith(".mp4")
    assert first.save_file != second.save_file
    assert str(single.save_file).endswith("20250728_123456.mp4")


# ---------------------------------------------------------------------------------------------------
# Refusals (each one line naming the input)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"task": "t2v-14B"}, "unknown task 't2v-14B'; use one of t2v-A14B, i2v-A14B, ti2v-5B"),
        ({"size": "1280*704"}, "--size '1280*704' is not supported by t2v-A14B; use one of 720*1280"),
        ({"size": "640*360"}, "--size '640*360' is not a size"),
        ({"frame_num": 80}, "--frame-num 80 is not of the form 4n+1"),
        ({"frame_num": 0}, "--frame-num 0 is not of the form 4n+1"),
        ({"frame_num": 2000}, "(the VAE packs 4 frames per latent); try 1001"),  # a value within the limit
        ({"sample_solver": "heun"}, "unknown --sample-solver 'heun'; use one of unipc, dpm++, euler"),
        ({"sample_steps": 0}, "--sample-steps 0 must be at least 1"),
        ({"sample_shift": -1.0}, "--sample-shift -1.0 must be a number > 0"),
        ({"sample_guide_scale": "1,2,3"}, "must be one number or two"),
        ({"sample_guide_scale": "abc"}, "must be one number or two"),
        ({"base_seed": -5}, "--base-seed -5 is out of range"),
        ({"crf": 60}, "--crf 60 is out of range"),
        ({"device": "gpu0"}, "--device 'gpu0' is not a device"),
        ({"prompt": "   "}, "the prompt is empty"),
        ({"save_file": Path("clip.gif")}, "must end in .mp4"),
        ({"image": Path("x.png")}, "t2v-A14B takes no --image"),
        ({"task": "i2v-A14B"}, "i2v-A14B needs an input image; pass --image"),
    ],
)
def test_settings_refused(tmp_path, changes, fragment):
    refused(tmp_path, fragment, **changes)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"magcache_thresh": 0.1}, "--magcache-thresh has no effect without --use-magcache"),
        ({"magcache_k": 3}, "--magcache-K has no effect without --use-magcache"),
        ({"use_magcache": True, "magcache_thresh": 0.0}, "--magcache-thresh 0.0 must be > 0"),
        ({"use_magcache": True, "magcache_k": 0}, "--magcache-K 0 must be >= 1"),
        ({"use_magcache": True, "retention_ratio": 1.0}, "--retention-ratio 1.0 must be in [0, 1)"),
        ({"use_magcache": True, "retention_ratio": -0.1}, "--retention-ratio -0.1 must be in [0, 1)"),
        ({"use_magcache": True, "magcache_mode": "fast"}, "unknown --magcache-mode 'fast'"),
        (
            {"use_magcache": True, "magcache_mode": "official", "retention_ratio": 0.0},
            "refused in official mode",
        ),
        ({"use_magcache": True, "magcache_speedup": 1.0}, "--magcache-speedup 1.0 must be > 1"),
        (
            {"use_magcache": True, "magcache_speedup": 2.0, "magcache_thresh": 0.1},
            "drop --magcache-thresh or",
        ),
        (
            {"use_magcache": True, "magcache_calibrate": Path("r.json")},
            "cannot be combined with --use-magcache",
        ),
        (
            {"magcache_calibrate": Path("r.json"), "magcache_k": 2},
            "--magcache-K does not apply to --magcache-calibrate",
        ),
        (
            {"use_magcache": True, "magcache_ratios": Path("nope.json")},
            "--magcache-ratios nope.json: ratios file not found",
        ),
    ],
)
def test_magcache_refused(tmp_path, changes, fragment):
    refused(tmp_path, fragment, **changes)


def test_magcache_options_are_carried(tmp_path):
    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps([1.0, 1.0, 0.99, 0.98]))
    request = build(
        tmp_path,
        use_magcache=True,
        magcache_thresh=0.08,
        magcache_k=3,
        retention_ratio=0.3,
        magcache_ratios=ratios,
    )
    mc = request.magcache
    assert (mc.enabled, mc.mode, mc.thresh, mc.K, mc.retention_ratio) == (True, "aligned", 0.08, 3, 0.3)
    assert mc.ratios_file == ratios


def test_invalid_ratios_file_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[1.0, -2.0]")
    refused(tmp_path, "every ratio must be a positive finite number", use_magcache=True, magcache_ratios=bad)


def test_calibration_without_magcache_is_accepted(tmp_path):
    request = build(tmp_path, magcache_calibrate=tmp_path / "ratios.json")
    assert request.magcache.calibrate_file == tmp_path / "ratios.json"
    assert not request.magcache.enabled


# ---------------------------------------------------------------------------------------------------
# Files: image, checkpoint, outputs


def test_image_checks(tmp_path):
    cfg = TASKS["i2v-A14B"]
    good = make_image(tmp_path / "ok.png")
    assert check_image(good, cfg) == good
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="is not a readable image"):
        check_image(tmp_path / "notes.txt", cfg)
    with pytest.raises(UserError, match="not found"):
        check_image(tmp_path / "missing.png", cfg)
    with pytest.raises(UserError, match="is a folder"):
        check_image(tmp_path, cfg)
    assert check_image(None, TASKS["ti2v-5B"]) is None  # optional there


@pytest.mark.parametrize("task", list(TASKS))
def test_complete_checkpoint_passes(tmp_path, task, make_checkpoint):
    ckpt = make_checkpoint(tmp_path / "ckpt", task)
    assert check_checkpoint_dir(ckpt, TASKS[task]).root == ckpt


def test_checkpoint_for_the_wrong_task_is_incomplete(tmp_path, make_checkpoint):
    ckpt = make_checkpoint(tmp_path / "ckpt", "ti2v-5B")
    with pytest.raises(UserError, match=r"incomplete for t2v-A14B: .*high_noise_model"):
        check_checkpoint_dir(ckpt, TASKS["t2v-A14B"])


def test_missing_checkpoint_dir_is_required(tmp_path):
    with pytest.raises(UserError, match="--ckpt-dir is required"):
        check_checkpoint_dir(None, TASKS["t2v-A14B"])


@pytest.mark.parametrize("existing", ["out.mp4", "out.json"])
def test_existing_outputs_need_overwrite(tmp_path, existing):
    (tmp_path / existing).write_bytes(b"old")
    refused(tmp_path, "already exists; pass --overwrite")
    assert build(tmp_path, overwrite=True).overwrite


def test_frames_folder_checks(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    assert build(tmp_path, save_frames=frames).save_frames == frames  # empty folder is fine
    (frames / "notes.txt").write_text("mine")
    refused(tmp_path, "exists and is not empty", save_frames=frames)
    refused(tmp_path, "refusing to replace folder", save_frames=frames, overwrite=True)


def test_calibration_file_must_not_be_the_sidecar(tmp_path):
    refused(tmp_path, "is the video's sidecar file", magcache_calibrate=tmp_path / "out.json")


def test_plan_settings_need_no_checkpoint_or_image(tmp_path):
    settings = plan_settings(GenerateOptions(task="i2v-A14B", magcache_thresh=0.05))
    assert settings.has_image  # i2v always conditions on an image
    assert settings.magcache.thresh == 0.05
    assert settings.sample_steps == 40
    with pytest.raises(UserError, match="--magcache-K 0 must be >= 1"):
        plan_settings(GenerateOptions(magcache_k=0))


# ---------------------------------------------------------------------------------------------------
# argv normalisation


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--frame_num", "81"], ["--frame-num=81"]),
        (["--frame_num=81"], ["--frame-num=81"]),
        (["--ckpt_dir", "/w/Wan2.2_T2V"], ["--ckpt-dir=/w/Wan2.2_T2V"]),
        (["--prompt", "--not_an_option"], ["--prompt=--not_an_option"]),
        (["--base_seed", "-1"], ["--base-seed=-1"]),
        (["--offload_model", "True"], ["--offload-model"]),
        (["--offload_model", "False", "--t5_cpu"], ["--no-offload-model", "--t5-cpu"]),
        (["--offload-model=no"], ["--no-offload-model"]),
        (["--offload-model", "--t5-cpu"], ["--offload-model", "--t5-cpu"]),
        (["--no-offload-model"], ["--no-offload-model"]),
        (["--sample_guide_scale", "3.0", "4.0"], ["--sample-guide-scale=3.0,4.0"]),
        (["--sample-guide-scale", "3", "--t5-cpu"], ["--sample-guide-scale=3", "--t5-cpu"]),
        (["--sample-guide-scale", "1", "2", "3"], ["--sample-guide-scale=1,2,3"]),  # refused later, by name
        (["--magcache_K", "3", "--magcache_thresh", "0.06"], ["--magcache-K=3", "--magcache-thresh=0.06"]),
        (["--use_magcache", "--retention_ratio", "0.2"], ["--use-magcache", "--retention-ratio=0.2"]),
        (["--ulysses_size", "1", "--prompt_extend_method", "local_qwen"], ["--ulysses-size=1"]),
        (["--dit_fsdp", "--t5_fsdp", "--ulysses_size=8"], ["--dit-fsdp", "--t5-fsdp", "--ulysses-size=8"]),
        (["--magcache_calibration"], ["--magcache-calibrate=mag_ratios.json"]),
        (["--frame-nmu", "3", "--some_thing"], ["--frame-nmu", "3", "--some_thing"]),
        (["--prompt", "x", "--", "--frame_num"], ["--prompt=x", "--", "--frame_num"]),
        (["-h"], ["-h"]),
    ],
)
def test_normalize_argv(argv, expected):
    assert normalize_argv(argv) == expected


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--offload_model", "maybe"], "--offload-model takes true or false, got 'maybe'"),
        (["--use_prompt_extend"], "prompt extension (Qwen/DashScope) is not supported"),
        (["--frame_num"], "--frame-num needs a value"),
    ],
)
def test_normalize_argv_refuses(argv, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        normalize_argv(argv)


OPTIONS = {"--frame-num": True, "--crf": True, "--prompt": True, "--use-magcache": False, "--help": False}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--foo"], "unknown option --foo; see --help for the options"),  # no '--crf' for '--foo'
        (["--frame-nmu=3"], "unknown option --frame-nmu; did you mean --frame-num?"),
        (["--frame_nmu", "3"], "unknown option --frame_nmu; did you mean --frame-num?"),
        (["--crff", "3"], "unknown option --crff; did you mean --crf?"),
        (["-x"], "unknown option -x; see --help for the options"),
        (["cat"], "unexpected argument 'cat': this command takes options only (see --help)"),
        (["--prompt", "a", "cat"], "unexpected argument 'cat' after --prompt: quote a value that has spaces"),
        (["--prompt=a", "cat"], "unexpected argument 'cat' after --prompt"),
        (["--use-magcache", "yes"], "unexpected argument 'yes': --use-magcache is a flag and takes no value"),
    ],
)
def test_option_names_are_checked(argv, message):
    with pytest.raises(UserError) as info:
        check_option_names(argv, OPTIONS)
    assert str(info.value).startswith(message)


def test_valid_option_names_pass():
    check_option_names(
        ["--frame-num", "81", "--prompt=a cat", "--use-magcache", "--crf", "-1", "--help"], OPTIONS
    )
    check_option_names([], OPTIONS)


def test_limits():
    cfg = TASKS["t2v-A14B"]
    check_limits(cfg, size="1280*720", frame_num=MAX_FRAME_NUM, sample_steps=MAX_SAMPLE_STEPS)
    with pytest.raises(UserError, match=f"--frame-num 1005 is over the limit of {MAX_FRAME_NUM}"):
        check_limits(cfg, frame_num=1005)
    with pytest.raises(UserError, match=f"--sample-steps 1001 is over the limit of {MAX_SAMPLE_STEPS}"):
        check_limits(cfg, sample_steps=1001)
    with pytest.raises(UserError, match="over the limit"):
        plan_settings(GenerateOptions(sample_steps=100000))


# ---------------------------------------------------------------------------------------------------
# Prompt files


def test_prompt_file_forms_and_problems(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "\n".join(
            [
                "# a comment",
                "a red fox runs through snow",
                "",
                '{"prompt": "a boat", "seed": 5, "frame-num": 17, "sample_guide_scale": [2, 3]}',
                '{"prompt": "x", "sead": 5}',
                '{"prompt": "y", "sample_steps": "ten"}',
                "{not json",
                '{"seed": 3}',
                '{"prompt": "z", "seed": 1, "base_seed": 2}',
            ]
        )
    )
    items, problems = parse_prompt_file(path)
    assert [i.line for i in items] == [2, 4]
    assert [i.number for i in items] == [1, 2]  # every item line counts, bad ones too
    assert [p.number for p in sorted(problems, key=lambda p: p.line)] == [3, 4, 5, 6, 7]
    assert items[0].overrides == {"prompt": "a red fox runs through snow"}
    assert items[1].overrides == {
        "prompt": "a boat",
        "base_seed": 5,
        "frame_num": 17,
        "sample_guide_scale": (2, 3),
    }
    messages = {p.line: p.message for p in problems}
    assert messages[5].startswith("unknown key 'sead'")
    assert messages[6] == "'sample_steps' must be an integer, got \"ten\""
    assert messages[7].startswith("not valid JSON")
    assert messages[8].startswith('no "prompt" key')
    assert "repeats a setting" in messages[9]
    assert str(problems[0]).startswith("line 5: ")


def test_unusable_prompt_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_prompt_file(tmp_path / "none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        parse_prompt_file(empty)


def test_batch_builds_one_request_per_item(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "first prompt\nsecond prompt\n"
        '{"prompt": "third", "save_file": "same.mp4"}\n'
        '{"prompt": "fourth", "save-file": "same.mp4"}\n'
        '{"prompt": "fifth", "size": "1280*704"}\n'
    )
    base = GenerateOptions(base_seed=-1, save_frames=Path("frames"))
    batch = build_batch(base, path, now=NOW, rng=random.Random(1))
    assert [e.line for e in batch.entries] == [1, 2, 3]
    first, second, third = (e.request for e in batch.entries)
    assert first.save_file != second.save_file  # default names carry the item index
    assert str(first.save_file).endswith("_001.mp4") and str(second.save_file).endswith("_002.mp4")
    assert third.save_file == Path("same.mp4")
    assert first.save_frames == Path("frames") / first.save_file.stem  # one frames folder per item
    assert all(e.random_seed for e in batch.entries)
    assert first.base_seed != second.base_seed
    problems = {p.line: p.message for p in batch.problems}
    assert "is also written by line 3" in problems[4]
    assert [p.number for p in batch.problems] == [4, 5]
    assert "--size '1280*704' is not supported by t2v-A14B" in problems[5]


@pytest.mark.parametrize(
    ("setting", "field", "value", "flag"),
    [
        ("thresh", "magcache_thresh", 0.0, "--magcache-thresh"),
        ("K", "magcache_k", 0, "--magcache-K"),
        ("retention", "retention_ratio", 1.0, "--retention-ratio"),
        ("mode", "magcache_mode", "fast", "--magcache-mode"),
    ],
)
def test_magcache_ranges_have_one_rule_and_one_message(setting, field, value, flag):
    """The policy checks each range; the CLI reports the same message under the flag's name."""
    from magcache_generate.magcache.policy import MagCacheConfig, MagCacheConfigError
    from magcache_generate.validate import magcache_options

    with pytest.raises(MagCacheConfigError) as policy:
        MagCacheConfig(**{setting: value})
    with pytest.raises(UserError) as cli:
        magcache_options(GenerateOptions(use_magcache=True, **{field: value}))
    assert policy.value.setting == setting and str(policy.value).startswith(("MagCache", "unknown MagCache"))
    assert str(cli.value) == policy.value.named(flag)


def test_offload_is_off_by_default_with_dit_fsdp(tmp_path):
    """--dit-fsdp keeps the experts sharded on the GPUs (upstream's multi-GPU way); an explicit choice wins."""
    assert build(tmp_path, dit_fsdp=True).offload_model is False
    assert (
        build(tmp_path, dit_fsdp=True, offload_model=True).offload_model is True
    )  # refused by the layout check
    assert build(tmp_path, offload_model=False).offload_model is False
