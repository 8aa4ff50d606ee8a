"""The CUDA caching allocator's setting for a run: expandable segments, unless the user chose one.

With the default allocator a run's reserved memory grows past what is live: blocks freed by one
stage's tensor shapes fit the next shapes badly (the first budgeted runs on an H100 held 0.7-1.9 GiB
more than they used). Expandable segments map memory into growing segments instead, so reserved
stays close to allocated and the plan's budget holds. A user's own PYTORCH_CUDA_ALLOC_CONF (or
PYTORCH_ALLOC_CONF) is left alone.
"""

from __future__ import annotations

import os
import sys

SETTING = "expandable_segments:True"
ENV_NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def prefer_expandable_segments() -> None:
    """Choose expandable segments for this process unless the user set the allocator's variables.

    Call before the first CUDA allocation: the variable is read when the allocator starts; the
    runtime setter also covers a torch that read it earlier (it applies to segments made after)."""
    if any(name in os.environ for name in ENV_NAMES):
        return
    os.environ[ENV_NAMES[0]] = SETTING
    torch = sys.modules.get("torch")  # not imported yet (the CLI): torch reads the variable itself
    setter = None
    if torch is not None:  # torch 2.11 deprecates the second name in favour of the first
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
            torch.cuda.memory, "_set_allocator_settings", None
        )
    if setter is not None and torch.cuda.is_available():
        try:
            setter(SETTING)
        except RuntimeError:  # a platform without expandable segments: the default allocator runs
            os.environ.pop(ENV_NAMES[0])


def allocator_setting() -> str:
    """What the allocator runs with, for the sidecar ('default' when nothing was set)."""
    for name in reversed(ENV_NAMES):  # the newer name wins where torch reads both
        if os.environ.get(name):
            return os.environ[name]
    return "default"
