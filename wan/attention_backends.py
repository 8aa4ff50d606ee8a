"""The attention backends a run may ask for, and whether one can run: torch-free, so the CLI can refuse a
bad `--attention` before torch is imported (the kernels themselves are in `wan.modules.attention`)."""

from __future__ import annotations

import importlib.util

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fa3", "fa2")
CUDA_ONLY = frozenset({"cudnn", "efficient", "fa3", "fa2"})
PACKAGES = {"fa3": "flash_attn_interface", "fa2": "flash_attn"}  # optional, imported lazily
PACKAGE_NAMES = {"fa3": "FlashAttention-3", "fa2": "flash-attn 2"}


def backend_installed(name: str) -> bool:
    """Whether the optional package a backend needs can be imported (looked up without importing it)."""
    package = PACKAGES.get(name)
    return package is None or importlib.util.find_spec(package) is not None


def backend_problem(name: str, device_type: str | None) -> str | None:
    """Why attention backend `name` cannot run on `device_type` ("cpu", "cuda"; None: not known yet),
    worded to follow the backend's name; None if it can."""
    if name not in BACKENDS:
        return f"is not an attention backend (one of {', '.join(BACKENDS)})"
    if not backend_installed(name):
        return f"needs {PACKAGE_NAMES[name]} (the {PACKAGES[name]} package), which is not installed"
    if name in CUDA_ONLY and device_type is not None and device_type != "cuda":
        return f"runs only on CUDA, not on {device_type}"
    return None
