"""Output layer: uint8 rule, mp4 and PNG writers, atomic writes, sidecar, input image, default name."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from goldens import missing_param, set_problem
from PIL import Image

from magcache_generate import video_io
from magcache_generate.atomic import (
    OutputExistsError,
    OutputPathError,
    atomic_write_file,
    atomic_write_folder,
    check_writable,
)
from magcache_generate.naming import default_save_file
from magcache_generate.video_io import (
    FrameSizeError,
    ImageNotFoundError,
    ImageReadError,
    VideoEncodeError,
    VideoPathError,
    read_image,
    sidecar_path,
    to_uint8_frames,
    write_frames_png,
    write_mp4,
    write_sidecar,
)

E2E_DIR = Path(os.environ.get("MAGCACHE_E2E_DIR", Path(__file__).parent / "golden_e2e"))


def smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    """Moving gradients: content H.264 keeps well (noise would not round-trip closely)."""
    t, y, x = np.meshgrid(np.arange(count), np.arange(height), np.arange(width), indexing="ij")
    red = 128 + 100 * np.sin(x / width * 2 * np.pi + t / 4)
    green = 40 + 180 * y / height
    blue = 128 + 90 * np.cos((x + y) / (width + height) * 2 * np.pi - t / 5)
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- uint8 rule ---------------------------------------------------------------------------------------


def test_uint8_hand_values():
    values = [-1.0, 1.0, 0.0, -3.0, 7.5, -0.5, 0.5, 1e-7]
    # 0 -> 127.5 and -0.5 -> 63.75 are where truncation and rounding disagree.
    expected = [0, 255, 127, 0, 255, 63, 191, 127]
    video = torch.tensor(values).reshape(1, 1, 1, -1).expand(3, 1, 1, -1)
    frames = to_uint8_frames(video)
    assert frames.dtype == np.uint8 and frames.shape == (1, 1, len(values), 3)
    assert frames[0, 0, :, 0].tolist() == expected


def test_uint8_layout_and_float32_rule():
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(3, 4, 5, 6, generator=generator) * 0.7
    frames = to_uint8_frames(video)
    assert frames.shape == (4, 5, 6, 3)
    # Independent statement of the rule in numpy float32: clamp, (x + 1) / 2, * 255, truncate.
    x = np.clip(video.numpy().astype(np.float32), -1, 1)
    expected = (((x + np.float32(1)) / np.float32(2)) * np.float32(255)).astype(np.uint8)
    np.testing.assert_array_equal(frames, expected.transpose(1, 2, 3, 0))
    # Lower-precision input is widened to float32 first, as upstream's video already is.
    half = video.to(torch.bfloat16)
    np.testing.assert_array_equal(to_uint8_frames(half), to_uint8_frames(half.float()))


def test_uint8_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        to_uint8_frames(torch.zeros(4, 1, 2, 2))


def e2e_cases() -> list:
    manifest = E2E_DIR / "manifest.json"
    names = sorted(json.loads(manifest.read_text())["cases"]) if manifest.is_file() else []
    if not names:  # fail, not skip: see goldens.py
        return [missing_param("e2e", f"no end-to-end case: {set_problem(E2E_DIR, 'MAGCACHE_E2E_DIR')}")]
    return [pytest.param(n, id=n, marks=pytest.mark.golden) for n in names]


@pytest.mark.parametrize("case", e2e_cases())
def test_uint8_matches_official_frames(case):
    """The official uint8 frames (PNG rows) equal to_uint8_frames of the official float video crop."""
    from safetensors.torch import load_file

    entry = json.loads((E2E_DIR / "manifest.json").read_text())["cases"][case]
    stored = load_file(E2E_DIR / entry["file"])
    crop = stored["output.video_crop"]
    rows = stored["output.frames_rows"].tolist()
    crop_h, crop_w = crop.shape[2], crop.shape[3]
    picked = [i for i, row in enumerate(rows) if row < crop_h]
    ours = to_uint8_frames(crop)
    assert len(picked) > 0
    for t in range(crop.shape[1]):
        png = stored[f"output.frames_png.{t}"].numpy().tobytes()
        official = np.asarray(Image.open(io.BytesIO(png)))
        np.testing.assert_array_equal(ours[t, [rows[i] for i in picked]], official[picked, :crop_w])


# ---- mp4 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [16, 24])
def test_mp4_round_trip(tmp_path, fps):
    import imageio

    frames = smooth_frames(9, 24, 40)  # even, but not a multiple of 16: must not be resized
    path = write_mp4(frames, tmp_path / "clip.mp4", fps=fps)
    assert listing(tmp_path) == ["clip.mp4"]
    reader = imageio.v2.get_reader(path, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        back = np.stack([f for f in reader])  # iterate: len(reader) is sys.maxsize for ffmpeg streams
    finally:
        reader.close()
    assert meta["codec"] == "h264" and meta["fps"] == fps and tuple(meta["size"]) == (40, 24)
    assert back.shape == frames.shape
    assert np.abs(back.astype(np.float64) - frames).mean() < 5


def test_mp4_rejects_odd_size_and_bad_suffix(tmp_path):
    with pytest.raises(FrameSizeError, match="even"):
        write_mp4(smooth_frames(2, 24, 41), tmp_path / "odd.mp4", fps=16)
    with pytest.raises(VideoPathError, match=r"\.mp4"):
        write_mp4(smooth_frames(2, 24, 40), tmp_path / "clip.avi", fps=16)
    assert listing(tmp_path) == []


def test_mp4_interrupt_leaves_nothing(tmp_path, monkeypatch):
    """KeyboardInterrupt while frames are streaming into ffmpeg: no target, no temp file."""
    calls = []

    def interrupted_view(obj):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return memoryview(obj)

    monkeypatch.setattr(video_io, "memoryview", interrupted_view, raising=False)
    with pytest.raises(KeyboardInterrupt):
        write_mp4(smooth_frames(6, 24, 40), tmp_path / "clip.mp4", fps=16)
    assert listing(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="fake ffmpeg is a shell script")
def test_mp4_ffmpeg_failure_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import imageio_ffmpeg

    fake = tmp_path / "fake-ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'Unknown encoder libx264' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(fake))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VideoEncodeError, match=r"exit 1.*Unknown encoder libx264") as raised:
        write_mp4(smooth_frames(2, 24, 40), out / "clip.mp4", fps=16)
    assert "\n" not in str(raised.value)
    assert listing(out) == []


# ---- PNG frames ---------------------------------------------------------------------------------------


def test_png_frames_bit_exact_and_sorted(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (12, 7, 10, 3), dtype=np.uint8)
    folder = write_frames_png(frames, tmp_path / "new" / "frames")
    names = listing(folder)
    assert names == [f"frame_{i:05d}.png" for i in range(12)]
    for i, name in enumerate(names):
        with Image.open(folder / name) as image:
            assert image.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(image), frames[i])
    assert listing(tmp_path / "new") == ["frames"]


def test_frames_folder_overwrite_rules(tmp_path):
    folder = tmp_path / "frames"
    write_frames_png(np.zeros((5, 4, 4, 3), np.uint8), folder)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_frames_png(np.ones((3, 4, 4, 3), np.uint8), folder)
    write_frames_png(np.full((3, 4, 4, 3), 9, np.uint8), folder, overwrite=True)
    assert listing(folder) == [f"frame_{i:05d}.png" for i in range(3)]  # no stale frames 3 and 4
    assert np.asarray(Image.open(folder / "frame_00000.png")).max() == 9
    assert listing(tmp_path) == ["frames"]
    # A folder holding other files is never deleted, even with overwrite.
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"notes\.txt"):
        write_frames_png(np.zeros((1, 4, 4, 3), np.uint8), folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    # An existing empty folder is not "existing".
    (tmp_path / "empty").mkdir()
    write_frames_png(np.zeros((1, 4, 4, 3), np.uint8), tmp_path / "empty")
    assert listing(tmp_path / "empty") == ["frame_00000.png"]


# ---- atomic writes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_file_failure_leaves_nothing(tmp_path, error):
    target = tmp_path / "out.mp4"
    seen = []

    def half_write(temp: Path) -> None:
        seen.append(temp)
        temp.write_bytes(b"half")
        assert not target.exists()  # the target never exists half-written
        raise error("stop")

    with pytest.raises(error):
        atomic_write_file(target, half_write)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".") and seen[0].suffix == ".mp4"
    assert listing(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_folder_failure_leaves_nothing(tmp_path, error):
    def half_write(temp: Path) -> None:
        (temp / "frame_00000.png").write_bytes(b"x")
        raise error("stop")

    with pytest.raises(error):
        atomic_write_folder(tmp_path / "frames", half_write)
    assert listing(tmp_path) == []


def test_atomic_file_overwrite_rules(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(OutputExistsError) as raised:
        atomic_write_file(target, lambda temp: temp.write_text("new"))
    message = str(raised.value)
    assert "out.json" in message and "pass --overwrite" in message and "\n" not in message
    assert isinstance(raised.value, FileExistsError) and target.read_text() == "old"
    atomic_write_file(target, lambda temp: temp.write_text("new"), overwrite=True)
    assert target.read_text() == "new" and listing(tmp_path) == ["out.json"]


def test_check_writable(tmp_path):
    missing_parents = tmp_path / "a" / "b" / "video.mp4"
    assert check_writable(missing_parents, overwrite=False) == missing_parents
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        check_writable(tmp_path / "file" / "video.mp4", overwrite=False)
    with pytest.raises(OutputPathError, match="existing folder"):
        check_writable(tmp_path, overwrite=True)
    with pytest.raises(OutputPathError, match="existing file"):
        check_writable(tmp_path / "file", overwrite=True, folder=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_check_writable_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="no permission"):
            check_writable(locked / "video.mp4", overwrite=False)
    finally:
        locked.chmod(0o700)


# ---- sidecar and input image --------------------------------------------------------------------------


def test_sidecar(tmp_path):
    video = tmp_path / "clip.mp4"
    data = {"prompt": "猫が草の上を歩く", "seed": 42, "ckpt": Path("/ckpt"), "steps": [1, 2]}
    path = write_sidecar(video, data)
    assert path == sidecar_path(video) == tmp_path / "clip.json"
    text = path.read_text(encoding="utf-8")
    assert "猫が草の上を歩く" in text and "\n  " in text
    assert json.loads(text) == {**data, "ckpt": "/ckpt"}
    with pytest.raises(OutputExistsError):
        write_sidecar(video, data)
    assert sidecar_path(tmp_path / "frames") == tmp_path / "frames.json"


def test_read_image_modes_and_errors(tmp_path):
    rgba = Image.new("RGBA", (5, 3), (10, 20, 30, 40))
    rgba.save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ImageNotFoundError, match=r"missing\.png") as raised:
        read_image(tmp_path / "missing.png")
    assert isinstance(raised.value, FileNotFoundError) and "--image" in str(raised.value)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"junk\.png"):
        read_image(tmp_path / "junk.png")
    with pytest.raises(ImageNotFoundError, match="folder"):
        read_image(tmp_path)


def test_read_image_ignores_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": upstream does not apply it, so neither do we
    Image.new("RGB", (8, 4), (200, 0, 0)).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").size == (8, 4)


# ---- default name -------------------------------------------------------------------------------------

NOW = datetime(2025, 7, 28, 9, 5, 3)


def test_default_name_pattern():
    name = default_save_file("t2v-A14B", "1280*720", "a cat walks/runs on grass", NOW)
    assert name == "t2v-A14B_1280x720_1_a_cat_walks_runs_on_grass_20250728_090503.mp4"
    long = default_save_file("ti2v-5B", "1280*704", "x" * 80, NOW)
    assert re.fullmatch(r"ti2v-5B_1280x704_1_x{50}_20250728_090503\.mp4", long)


def test_default_name_is_shell_safe():
    prompt = 'it\'s a "cat" *glob* $(rm -rf ~) `x`; a|b & c\nnew\tline <>:\\?'
    name = default_save_file("i2v-A14B", "832*480", prompt, NOW)
    assert shlex.quote(name) == name  # nothing a POSIX shell would interpret
    assert not set(name) & set("<>:\"/\\|?*\n\t '$`;&()")
    assert name.startswith("i2v-A14B_832x480_1_it_s_a__cat___glob") and name.endswith("_20250728_090503.mp4")
    assert len(name.split("_1_", 1)[1]) == 50 + len("_20250728_090503.mp4")


def test_default_name_keeps_non_ascii_letters():
    name = default_save_file("t2v-A14B", "1280*720", "一只猫，在草地上 café", NOW)
    assert name == "t2v-A14B_1280x720_1_一只猫_在草地上_café_20250728_090503.mp4"
