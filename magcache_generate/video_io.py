"""Turning the decoded video into files: uint8 frames, an H.264 mp4, PNG frames, a JSON sidecar.

Also reads the input image. Every output is written atomically (see ``atomic.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from magcache_generate.atomic import atomic_write_file, atomic_write_folder, check_writable
from magcache_generate.naming import (  # noqa: F401 - VIDEO_SUFFIXES, sidecar_path re-exported
    FRAME_NAME_PATTERN,
    VIDEO_SUFFIXES,
    sidecar_path,
    video_suffix_problem,
)

# Upstream writes with imageio quality=8, which imageio-ffmpeg turns into int((1 - 8/10) * 51) = crf 10.
DEFAULT_CRF = 10


class VideoPathError(ValueError):
    """The video output path has no usable container suffix."""


class FrameSizeError(ValueError):
    """Frames whose size H.264 in yuv420p cannot store."""


class VideoEncodeError(RuntimeError):
    """ffmpeg failed while encoding the video."""


class ImageNotFoundError(FileNotFoundError):
    """The input image does not exist."""


class ImageReadError(ValueError):
    """The input image exists but cannot be decoded."""


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Convert a float video [3, T, H, W] in [-1, 1] to uint8 frames [T, H, W, 3] exactly as upstream does.

    Upstream (``save_video`` + torchvision ``make_grid(normalize=True, value_range=(-1, 1))``) runs, in
    float32: clamp to [-1, 1], ``sub_(-1)``, ``div_(2)``, ``* 255`` and ``.type(torch.uint8)``, which
    truncates toward zero instead of rounding. The same ops run here, so the bytes are identical.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video of shape [3, T, H, W], got {list(video.shape)}")
    x = video.detach().to(device="cpu", dtype=torch.float32)
    # Upstream clamps twice (save_video, then make_grid); once gives the same values.
    x = x.clamp(-1, 1).sub(-1).div(2)
    # Upstream quirk: truncation, not rounding (0.0 maps to 127, not 128).
    frames = (x * 255).type(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().numpy()


def check_video_path(path: str | os.PathLike, overwrite: bool) -> Path:
    """Check a video output path before any model is loaded: container suffix and ``check_writable``."""
    path = Path(path)
    problem = video_suffix_problem(path)
    if problem:
        raise VideoPathError(f"video file {problem}")
    return check_writable(path, overwrite)


def check_frames_folder(folder: str | os.PathLike, overwrite: bool) -> Path:
    """Check a PNG frames folder before any model is loaded; ``overwrite`` may only replace our frames."""
    return check_writable(folder, overwrite, folder=True, replaceable=FRAME_NAME_PATTERN)


def write_mp4(
    frames: np.ndarray,
    path: str | os.PathLike,
    fps: float,
    crf: int = DEFAULT_CRF,
    *,
    overwrite: bool = False,
    comment: str | None = None,
) -> Path:
    """Encode uint8 frames [T, H, W, 3] as H.264 (libx264, yuv420p, ``-crf``) with imageio-ffmpeg's ffmpeg.

        The command is the one imageio-ffmpeg builds for upstream's ``imageio.get_writer(codec='libx264',
        quality=8)``, except that frames are never rescaled: imageio's default ``macro_block_size=16`` would
        silently resize sizes that are not multiples of 16, so this writer keeps the size as is and instead
        requires an even width and height (yuv420p halves the chroma planes) and raises ``FrameSizeError``
        otherwise. Unlike imageio-ffmpeg it checks ffmpeg's exit status. ``comment`` goes into the file's
    ``comment`` metadata tag (the generation settings, `reproduce.settings_comment`). Returns the written path.
    """
    frames = _checked_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in 0..51 (libx264; lower is better quality), got {crf}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise FrameSizeError(
            f"cannot encode {width}x{height} (WxH) frames as yuv420p H.264: width and height must be even; "
            "save PNG frames instead or choose an even size"
        )
    path = check_video_path(path, overwrite)

    def encode(temp: Path) -> None:
        _run_ffmpeg(frames, temp, fps, crf, comment)

    return atomic_write_file(path, encode, overwrite=overwrite)


def _run_ffmpeg(frames: np.ndarray, path: Path, fps: float, crf: int, comment: str | None = None) -> None:
    import imageio_ffmpeg  # only needed when a video is written

    _, height, width, _ = frames.shape
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-y",
        "-hide_banner",
        "-f", "rawvideo",
        "-vcodec", "rawvideo",
        "-s", f"{width}x{height}",
        "-pix_fmt", "rgb24",
        "-r", str(Fraction(fps).limit_denominator()),
        "-i", "-",
        "-an",
        "-vcodec", "libx264",
        "-pix_fmt", "yuv420p",
        "-crf", str(crf),
        "-v", "error",
        *(("-metadata", f"comment={comment}") if comment is not None else ()),
        str(path),
    ]  # fmt: skip
    # stderr goes to a file, not a pipe: a full pipe would block ffmpeg while we block on its stdin.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            try:
                for frame in frames:
                    process.stdin.write(memoryview(frame).cast("B"))
            except BrokenPipeError:
                pass  # ffmpeg exited early; its exit status and log below say why
            finally:
                with contextlib.suppress(BrokenPipeError):
                    process.stdin.close()
            returncode = process.wait()
        finally:
            if process.poll() is None:  # interrupted: stop ffmpeg before the temp file is removed
                process.kill()
                process.wait()
        if returncode != 0:
            log.seek(0)
            lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
            reason = lines[-1].strip() if lines else "no message"
            raise VideoEncodeError(f"ffmpeg failed (exit {returncode}) writing '{path}': {reason}")


def frame_file_name(index: int, count: int) -> str:
    """``frame_00000.png`` ...: zero-padded so that names sort in frame order."""
    return f"frame_{index:0{max(5, len(str(count - 1)))}d}.png"


def write_frames_png(frames: np.ndarray, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write uint8 frames [T, H, W, 3] as lossless 8-bit RGB PNGs ``frame_00000.png``, ... into ``folder``.

    The folder appears complete or not at all; with ``overwrite`` it may only replace a folder that holds
    nothing but frame PNGs. Returns the folder.
    """
    frames = _checked_frames(frames)

    def write_all(temp: Path) -> None:
        for index, frame in enumerate(frames):
            Image.fromarray(frame).save(temp / frame_file_name(index, len(frames)))

    return atomic_write_folder(folder, write_all, overwrite=overwrite, replaceable=FRAME_NAME_PATTERN)


def _checked_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"expected uint8 frames [T, H, W, 3] with T >= 1, got {frames.dtype} {list(frames.shape)}"
        )
    return np.ascontiguousarray(frames)


def write_sidecar(output: str | os.PathLike, data: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``data`` as pretty UTF-8 JSON next to ``output`` (see ``sidecar_path``), atomically.

    Values JSON has no type for (paths, dtypes, datetimes) are written as their ``str()``. Returns the
    sidecar's path.
    """
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    return atomic_write_file(
        sidecar_path(output), lambda temp: temp.write_text(text, encoding="utf-8"), overwrite=overwrite
    )


def read_image(path: str | os.PathLike) -> Image.Image:
    """Read an input image as RGB, as upstream does (``Image.open(...).convert("RGB")``, EXIF orientation ignored)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise ImageNotFoundError(f"input image '{path}' {what}; check the --image path")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(
            f"cannot read input image '{path}' ({type(error).__name__}: {error}); pass a PNG or JPEG file"
        ) from error
