import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_checkpoint_source(tmp_path_factory):
    """task -> a complete tiny random checkpoint folder in the official layout, built once per session."""
    from wan.testing.checkpoint import write_tiny_checkpoint

    built: dict[str, Path] = {}

    def source(task: str) -> Path:
        if task not in built:
            built[task] = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt") / task, task, seed=5)
        return built[task]

    return source


@pytest.fixture
def make_checkpoint(tiny_checkpoint_source):
    """make_checkpoint(root, task): a private copy of the task's tiny checkpoint at ``root`` (tests may
    damage it)."""

    def make(root: Path, task: str) -> Path:
        shutil.copytree(tiny_checkpoint_source(task), root)
        return root

    return make


def pytest_collection_modifyitems(config, items):
    """The multi-process tests (marker `distributed`) start several processes each, minutes in all on a
    small CPU machine: they run when asked for, with -m distributed (or MAGCACHE_TEST_DISTRIBUTED=1)."""
    if "distributed" in (config.getoption("-m") or "") or os.environ.get("MAGCACHE_TEST_DISTRIBUTED") == "1":
        return
    skip = pytest.mark.skip(reason="starts several processes: run with -m distributed")
    for item in items:
        if "distributed" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """A golden or e2e case made for a missing golden set (goldens.missing_param) fails instead of running."""
    marker = item.get_closest_marker("golden_missing")
    if marker is not None:
        pytest.fail(marker.args[0], pytrace=False)


@pytest.fixture
def failing_page_lock(monkeypatch):
    """CUDA looks available and every cudaHostRegister fails (out of memory); returns the sizes tried."""
    import wan.placement as placement_module

    calls: list[int] = []

    class FailingCudart:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(size)
            return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FailingCudart())
    monkeypatch.setattr(placement_module, "_consume_cuda_error", lambda: None)
    return calls
