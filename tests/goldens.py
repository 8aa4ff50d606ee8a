"""The golden-test contract shared by every golden test.

A golden set is a folder with ``manifest.json`` and one ``<name>.safetensors`` per golden, made by
running the official code on tiny random weights. Tests read the set named by the environment
variable ``MAGCACHE_GOLDEN_DIR`` (default: the copy in ``tests/golden``), discover goldens through the
manifest, use the golden names as test ids and carry the ``golden`` marker, so any golden set of
this format (other seeds, dims or step counts) can be checked.

A missing folder, a missing manifest or a manifest without the goldens a test asks for FAILS that
test (one ``MISSING-...`` case naming what is absent) rather than skipping it: a mistyped
``MAGCACHE_GOLDEN_DIR`` must not turn the parity checks into a green run that checked nothing.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest

DEFAULT_DIR = Path(__file__).parent / "golden"


def golden_dir() -> Path:
    return Path(os.environ.get("MAGCACHE_GOLDEN_DIR", DEFAULT_DIR))


@cache
def manifest() -> dict:
    path = golden_dir() / "manifest.json"
    if not path.is_file():
        return {"goldens": {}}
    return json.loads(path.read_text())


def golden_params(prefix: str) -> list:
    """pytest params, one per golden whose name starts with ``prefix``, id = golden name; or one
    failing ``MISSING-<prefix>`` param when the set has none of them."""
    names = sorted(n for n in manifest()["goldens"] if n.startswith(prefix))
    if not names:
        return [
            missing_param(
                prefix, f"no '{prefix}*' golden: {set_problem(golden_dir(), 'MAGCACHE_GOLDEN_DIR')}"
            )
        ]
    return [pytest.param(n, id=n, marks=pytest.mark.golden) for n in names]


def set_problem(folder: Path, variable: str) -> str:
    """Why a golden folder yields no case, for the failure message."""
    where = f"{variable}={folder}" if variable in os.environ else f"{folder} (default; set {variable})"
    if not folder.is_dir():
        return f"the golden folder {where} does not exist"
    if not (folder / "manifest.json").is_file():
        return f"the golden folder {where} has no manifest.json"
    return f"{where}/manifest.json lists none"


def missing_param(what: str, reason: str):
    """A test case that fails with ``reason`` (conftest turns the ``golden_missing`` mark into a failure)."""
    return pytest.param(
        None, id=f"MISSING-{what}", marks=[pytest.mark.golden, pytest.mark.golden_missing(reason)]
    )


def entry(name: str) -> dict:
    return manifest()["goldens"][name]


def tensors(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(golden_dir() / entry(name)["file"])


def weights_entry(name: str) -> dict:
    return manifest()["weights"][name]


def weights_path(name: str) -> Path:
    w = weights_entry(name)
    if "folder" in w:
        return golden_dir() / w["folder"]
    return golden_dir() / w["files"][0]


def indexed(tensor_dict: dict, prefix: str) -> list:
    """Collect ``prefix.0``, ``prefix.1``, ... in order."""
    out = []
    while f"{prefix}.{len(out)}" in tensor_dict:
        out.append(tensor_dict[f"{prefix}.{len(out)}"])
    return out


def assert_frames_match(frames_dir: Path, data: dict, frames: dict) -> None:
    """Our `--save-frames` PNGs against an e2e golden's stored rows (manifest ``frames`` entry, PNG bytes
    under ``output.frames_png.<i>``): mean abs difference <= 0.3 levels and max <= 8."""
    import io

    import numpy as np
    from PIL import Image

    rows = frames["stored_rows"]
    files = sorted(Path(frames_dir).glob("*.png"))
    assert len(files) == frames["shape"][0]
    diffs = []
    for i, path in enumerate(files):
        ours = np.asarray(Image.open(path).convert("RGB"))
        assert list(ours.shape) == frames["shape"][1:]
        ref = np.asarray(
            Image.open(io.BytesIO(data[f"output.frames_png.{i}"].numpy().tobytes())).convert("RGB")
        )
        diffs.append(np.abs(ours[rows].astype(np.int16) - ref.astype(np.int16)))
    diff = np.stack(diffs)
    assert diff.mean() <= 0.3 and diff.max() <= 8, (diff.mean(), diff.max())


def installed_cli() -> list[str]:
    """The installed console script (what users run), else the module entry point of this interpreter."""
    import sys

    script = Path(sys.executable).parent / "magcache-generate"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "magcache_generate"]
