"""PSNR and SSIM (magcache_generate.quality) against reference values from scikit-image."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magcache_generate.quality import (
    FrameScores,
    gaussian_window,
    luma,
    psnr,
    ssim,
    summary_line,
    video_quality,
)

DATA = Path(__file__).parent / "data" / "quality"

# Reference values for the image pairs in tests/data/quality (uint8 RGB PNGs, 64x48 and 53x37, made once
# with numpy's default_rng(20250613)). Computed with scikit-image 0.26.0 (numpy 2.4.6) in a throwaway venv:
#   peak_signal_noise_ratio(a, b, data_range=255)                      on the RGB uint8 arrays
#   structural_similarity(ya, yb, gaussian_weights=True, sigma=1.5,
#                         use_sample_covariance=False, data_range=255) on float64 luma
#                                                                      y = rgb @ [0.299, 0.587, 0.114]
SKIMAGE_REFERENCE = {
    "noise": (31.019746098631256, 0.9953144879713706),
    "smooth": (22.76716173527835, 0.9391215145343916),
    "dark": (13.66888969116635, 0.720675421356904),
}


def pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    return tuple(np.asarray(Image.open(DATA / f"{name}_{side}.png").convert("RGB")) for side in "ab")


@pytest.mark.parametrize("name", sorted(SKIMAGE_REFERENCE))
def test_psnr_and_ssim_equal_scikit_image(name):
    a, b = pair(name)
    ref_psnr, ref_ssim = SKIMAGE_REFERENCE[name]
    assert psnr(a, b) == pytest.approx(ref_psnr, rel=1e-12)
    assert ssim(luma(a), luma(b)) == pytest.approx(ref_ssim, abs=1e-12)


def test_window_is_the_papers():
    taps = gaussian_window()
    assert taps.shape == (11,) and taps.sum() == pytest.approx(1.0)
    assert taps[5] / taps[4] == pytest.approx(math.exp(1 / (2 * 1.5**2)))  # sigma 1.5


def test_identical_and_symmetric():
    a, b = pair("smooth")
    assert psnr(a, a) == math.inf
    assert ssim(luma(a), luma(a)) == pytest.approx(1.0, abs=1e-12)
    assert ssim(luma(a), luma(b)) == pytest.approx(ssim(luma(b), luma(a)), abs=1e-12)
    assert luma(np.array([[255, 255, 255]], dtype=np.uint8))[0] == pytest.approx(255.0)


def test_ssim_needs_a_full_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((10, 40)), np.zeros((10, 40)))
    with pytest.raises(ValueError, match="one shape"):
        ssim(np.zeros((20, 20)), np.zeros((20, 21)))


def test_video_quality_per_frame_worst_frame_and_whole_video_psnr():
    a, b = pair("noise")
    _, c = pair("dark")  # another size: build a 3-frame video from the noise pair only
    reference = np.stack([a, a, a])
    candidate = np.stack([a, b, np.clip(b.astype(int) + 9, 0, 255).astype(np.uint8)])
    q = video_quality(reference, candidate)
    assert (q.frames, q.width, q.height) == (3, 64, 48)
    per_frame = q.psnr_db.per_frame
    assert per_frame[0] == math.inf and per_frame[1] == pytest.approx(SKIMAGE_REFERENCE["noise"][0])
    assert q.psnr_db.worst_frame == 2 and q.ssim.worst_frame == 2
    # the whole video's PSNR comes from the mean MSE, so one identical frame keeps it finite
    mean_mse = sum(q.mse) / 3
    assert q.video_psnr_db == pytest.approx(10 * math.log10(255**2 / mean_mse))
    assert q.ssim.mean == pytest.approx(sum(q.ssim.per_frame) / 3)
    data = q.to_json()
    assert data["psnr_db"]["per_frame"][0] is None and data["psnr_db"]["worst_frame"] == 2
    assert data["ssim"]["mean"] == round(q.ssim.mean, 6) and data["ssim"]["per_frame"][0] == 1.0
    assert data["size_wh"] == [64, 48] and "luma" in data["method"]
    line = summary_line(data)
    assert line.startswith(f"PSNR {q.video_psnr_db:.2f} dB, worst frame 2 ") and "SSIM mean" in line
    with pytest.raises(ValueError, match="differ in shape"):
        video_quality(reference, c[None])


def test_identical_videos_have_null_psnr_in_json():
    a, _ = pair("smooth")
    data = video_quality(a[None], a[None]).to_json()
    assert data["psnr_db"]["video"] is None and data["psnr_db"]["worst"] is None
    assert "inf (identical)" in summary_line(data)


def test_frame_scores():
    scores = FrameScores((0.9, 0.5, 0.7))
    assert scores.worst_frame == 1 and scores.worst == 0.5 and scores.mean == pytest.approx(0.7)
