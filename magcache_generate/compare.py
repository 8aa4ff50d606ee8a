"""``magcache-generate compare A B [--json]``: PSNR and SSIM of video B against video A.

Either argument is a video file (decoded to RGB by ffmpeg) or a folder of PNG frames (such as a
``--save-frames`` folder, read in name order). ``--magcache-verify`` scores its two saved videos with
the same ``read_frames`` and ``compare_files``, so its figures equal this command's on those files.
Torch-free: the command starts in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from magcache_generate.quality import VideoQuality, summary_line, video_quality
from magcache_generate.request import UserError


def read_frames(path: Path) -> np.ndarray:
    """uint8 RGB frames ``[T, H, W, 3]`` of a video file or a folder of PNG frames."""
    path = Path(path)
    if path.is_dir():
        return _read_png_folder(path)
    if not path.is_file():
        raise UserError(f"'{path}' not found; give a video file or a folder of PNG frames")
    return _read_video(path)


def _read_png_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise UserError(f"folder '{folder}' holds no .png frames; give a --save-frames folder or a video")
    frames = []
    for file in files:
        try:
            with Image.open(file) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError) as err:
            raise UserError(f"frame '{file}' is not a readable PNG ({err})") from None
        if frames[-1].shape != frames[0].shape:
            h, w = frames[-1].shape[:2]
            h0, w0 = frames[0].shape[:2]
            raise UserError(
                f"frame '{file}' is {w}x{h} but '{files[0].name}' is {w0}x{h0}; one size per folder"
            )
    return np.stack(frames)


def _read_video(path: Path) -> np.ndarray:
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3) for data in reader]
    except (OSError, RuntimeError, StopIteration, KeyError, ValueError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"'{path}' is not a readable video ({reason})") from None
    if not frames:
        raise UserError(f"video '{path}' has no frames")
    return np.stack(frames)


def compare_frames(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("A", "B")) -> VideoQuality:
    """Quality of ``b`` against ``a``; frame count and size must agree (a ``UserError`` says which differs)."""
    if a.shape[0] != b.shape[0]:
        raise UserError(
            f"'{names[0]}' has {a.shape[0]} frames but '{names[1]}' has {b.shape[0]}; compare like videos"
        )
    if a.shape[1:3] != b.shape[1:3]:
        raise UserError(
            f"'{names[0]}' is {a.shape[2]}x{a.shape[1]} but '{names[1]}' is {b.shape[2]}x{b.shape[1]} (WxH); "
            "compare videos of one size"
        )
    try:
        return video_quality(a, b)
    except ValueError as err:
        raise UserError(str(err)) from None


def compare_files(a: Path, b: Path) -> VideoQuality:
    """Decode both files (or frame folders) and score ``b`` against ``a``."""
    return compare_frames(read_frames(a), read_frames(b), (str(a), str(b)))


def compare(
    reference: Annotated[
        Path, typer.Argument(help="Reference video (e.g. the dense one) or PNG frames folder.")
    ],
    candidate: Annotated[
        Path, typer.Argument(help="Video (or PNG frames folder) scored against the reference.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """PSNR and SSIM of CANDIDATE against REFERENCE, per frame, with the worst frame."""
    quality = compare_files(reference, candidate)
    if as_json:
        typer.echo(
            json.dumps({"reference": str(reference), "candidate": str(candidate), **quality.to_json()})
        )
        return
    typer.echo(f"{candidate} vs {reference}: {quality.frames} frames, {quality.width}x{quality.height}")
    typer.echo(summary_line(quality.to_json()))


def command():
    """The click command ``cli.main`` runs for ``magcache-generate compare ...``."""
    app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
    app.command()(compare)
    return typer.main.get_command(app)
