"""`magcache-generate --magcache-plan --json --magcache-mode official` equals the upstream schedules of
magcache-reference.md section 2 (default presets), without any checkpoint."""

import json

import pytest

from magcache_generate import cli

# (task, image?) -> (cond skipped steps, uncond skipped steps, forwards, dense forwards)
UPSTREAM = {
    ("t2v-A14B", False): (
        [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 32, 34, 36],
        [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 32, 34, 36],
        52,
        80,
    ),
    ("i2v-A14B", True): (
        [18, 19, 21, 22, 24, 25, 27, 29, 31, 33],
        [17, 18, 20, 21, 23, 24, 26, 27, 29, 31, 33],
        59,
        80,
    ),
    ("ti2v-5B", False): (
        [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29, 31, 32, 34, 35, 37, 39, 41, 43, 45, 47, 49],
        [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29, 31, 32, 34, 35, 37, 39, 41, 43, 45, 47, 49],
        50,
        100,
    ),
    ("ti2v-5B", True): (
        [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29, 31, 32, 34, 35, 37, 39, 41, 43, 45, 49],
        [10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29, 31, 32, 34, 35, 37, 39, 41, 43, 45, 49],
        52,
        100,
    ),
}


@pytest.mark.parametrize(
    ("task", "image"), list(UPSTREAM), ids=[f"{t}-{'image' if i else 'text'}" for t, i in UPSTREAM]
)
def test_plan_json_equals_upstream_schedule(task, image, tmp_path, capsys):
    argv = ["--task", task, "--magcache-plan", "--json", "--magcache-mode", "official"]
    if image:
        from PIL import Image

        Image.new("RGB", (64, 48), (120, 30, 200)).save(tmp_path / "in.png")
        argv += ["--image", str(tmp_path / "in.png")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    plan = json.loads(capsys.readouterr().out)
    cond, uncond, forwards, dense = UPSTREAM[(task, image)]
    assert set(plan) >= {"task", "steps", "mode", "forwards", "dense_forwards", "calls"}
    assert (plan["task"], plan["mode"], plan["forwards"], plan["dense_forwards"]) == (
        task,
        "official",
        forwards,
        dense,
    )
    for branch, expected in (("cond", cond), ("uncond", uncond)):
        skipped = [c["step"] for c in plan["calls"] if c["branch"] == branch and not c["computed"]]
        assert skipped == expected
    experts = {c["expert"] for c in plan["calls"]}
    assert experts == ({"single"} if task == "ti2v-5B" else {"high", "low"})
