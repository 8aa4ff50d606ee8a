"""Output names: the default video name (upstream's pattern made safe to paste into a shell), the
accepted video suffixes and where a video's JSON sidecar goes. Torch-free: the CLI checks them early."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from pathlib import Path

PROMPT_CHARS_IN_NAME = 50

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".m4v")
FRAME_NAME_PATTERN = re.compile(r"frame_\d{5,}\.png")


def video_suffix_problem(path: Path) -> str | None:
    """Why ``path`` cannot name a video file (its suffix), or None when it can."""
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return None
    return f"'{path}' must end in {', '.join(VIDEO_SUFFIXES)} (ffmpeg picks the container from it)"


def sidecar_path(output: str | Path) -> Path:
    """Where the JSON sidecar of a video file or frames folder goes: ``out/video.mp4`` -> ``out/video.json``."""
    return Path(output).with_suffix(".json")


def dense_reference_path(save_file: str | Path) -> Path:
    """Where ``--magcache-verify`` writes the dense reference video: ``out/video.mp4`` -> ``out/video.dense.mp4``."""
    path = Path(save_file)
    return path.with_name(f"{path.stem}.dense{path.suffix}")


def default_save_file(task: str, size: str, prompt: str, now: datetime, *, ulysses_size: int = 1) -> str:
    """``{task}_{size}_{ulysses_size}_{prompt[:50]}_{YYYYmmdd_HHMMSS}.mp4``, as upstream's generate.py names it.

    Upstream replaces ' ' and '/' in the prompt by '_' and keeps the first 50 characters; so does this.
    Two deliberate differences make the name safe to use unquoted in a shell and valid on Windows:

    * the size keeps ``x`` instead of ``*`` (``1280*720`` -> ``1280x720``; upstream does this on win32
      only), since ``*`` is a shell glob and not allowed in Windows file names;
    * every other character that is not an ASCII letter or digit, ``-``, ``_`` or ``.``, nor a non-ASCII
      letter, digit or combining mark, becomes ``_``. That removes shell syntax (quotes, ``$``, ``;``,
      ``&``, ``|``, ``*``, ``?``, brackets, backslash, backtick), the characters Windows forbids
      (``<>:"/\\|?*``), whitespace and control characters such as newlines, while prompts in other
      scripts (Chinese, accented Latin) stay readable.
    """
    prompt_part = prompt.replace(" ", "_").replace("/", "_")[:PROMPT_CHARS_IN_NAME]
    stem = f"{task}_{size.replace('*', 'x')}_{ulysses_size}_{prompt_part}_{now.strftime('%Y%m%d_%H%M%S')}"
    return "".join(ch if _is_safe(ch) else "_" for ch in stem) + ".mp4"


def _is_safe(ch: str) -> bool:
    if ch.isascii():
        return ch.isalnum() or ch in "-_."
    # L*: letters, N*: digits, M*: combining marks (accents typed as separate code points).
    return unicodedata.category(ch)[0] in "LNM"
