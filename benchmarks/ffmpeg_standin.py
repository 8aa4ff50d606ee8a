"""A stand-in for the `ffmpeg` executable, for the GPU check on an offline machine that has no ffmpeg
(the offline wheel set of `benchmarks/fetch_gpu_wheels.sh` leaves out imageio-ffmpeg's static ffmpeg,
80 MB, 20 MB even xz-compressed, to keep the copy small). `benchmarks/gpu_check.sh` points
IMAGEIO_FFMPEG_EXE at it only when no working ffmpeg is found, and the results say so.

It understands the one command `magcache_generate.video_io.write_mp4` builds (rawvideo rgb24 frames on
stdin, one .mp4 out) and encodes with OpenCV (on the GPU image) as MPEG-4 Part 2 ('mp4v'), not H.264:
the mp4 is a valid video, but its size, quality and encoding time are not those of a real run. Nothing
the GPU check measures depends on them (the write stage is not a target). Anything else (decoding, other
formats) exits with an error naming this stand-in.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from fractions import Fraction
from typing import BinaryIO

import numpy as np

NAME = "ffmpeg stand-in (OpenCV mp4v, benchmarks/ffmpeg_standin.py)"


class Unsupported(ValueError):
    pass


def parse(argv: list[str]) -> tuple[int, int, float, str]:
    """(width, height, fps, output path) of write_mp4's command; Unsupported for anything else."""
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) - 1:
        if argv[i].startswith("-") and argv[i] not in ("-y", "-hide_banner", "-an"):
            options.setdefault(argv[i], argv[i + 1])  # the first -pix_fmt/-vcodec is the input's
            i += 2
        else:
            i += 1
    if options.get("-f") != "rawvideo" or options.get("-i") != "-" or options.get("-pix_fmt") != "rgb24":
        raise Unsupported(f"{NAME} only encodes rawvideo rgb24 from stdin; got {' '.join(argv)}")
    output = argv[-1]
    if not output.lower().endswith(".mp4"):
        raise Unsupported(f"{NAME} only writes .mp4 files; got '{output}'")
    width, height = (int(v) for v in options["-s"].split("x"))
    return width, height, float(Fraction(options.get("-r", "25"))), output


def encode(stream: BinaryIO, width: int, height: int, write: Callable[[np.ndarray], None]) -> int:
    """Read whole rgb24 frames from `stream`, hand each to `write` as BGR; the number of frames."""
    size = width * height * 3
    count = 0
    while True:
        data = stream.read(size)
        if not data:
            return count
        if len(data) != size:
            raise Unsupported(f"{NAME}: input ended inside frame {count} ({len(data)} of {size} bytes)")
        frame = np.frombuffer(data, np.uint8).reshape(height, width, 3)
        write(np.ascontiguousarray(frame[:, :, ::-1]))
        count += 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["-version"]:
        print(f"ffmpeg version 0 {NAME}")
        return 0
    try:
        width, height, fps, output = parse(argv)
        import cv2

        writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise Unsupported(f"{NAME}: OpenCV cannot open '{output}' for writing")
        try:
            encode(sys.stdin.buffer, width, height, writer.write)
        finally:
            writer.release()
    except (Unsupported, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
