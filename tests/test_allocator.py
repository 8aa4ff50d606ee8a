"""The CUDA allocator setting the CLI chooses: expandable segments, unless the user set one."""

import os

import pytest

from magcache_generate import allocator


@pytest.fixture
def clean_env(monkeypatch):
    for name in allocator.ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_expandable_segments_are_chosen_when_nothing_is_set(clean_env):
    assert allocator.allocator_setting() == "default"
    allocator.prefer_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert allocator.allocator_setting() == "expandable_segments:True"


@pytest.mark.parametrize("name", allocator.ENV_NAMES)
def test_a_users_setting_is_left_alone(clean_env, name):
    clean_env.setenv(name, "max_split_size_mb:128")
    allocator.prefer_expandable_segments()
    assert all(os.environ.get(n) in (None, "max_split_size_mb:128") for n in allocator.ENV_NAMES)
    assert allocator.allocator_setting() == "max_split_size_mb:128"


def test_the_cli_chooses_it_before_running(clean_env, tmp_path):
    from magcache_generate.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
