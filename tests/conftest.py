import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    """A golden or e2e case made for a missing golden set (goldens.missing_param) fails instead of running."""
    marker = item.get_closest_marker("golden_missing")
    if marker is not None:
        pytest.fail(marker.args[0], pytrace=False)
