"""Full-reference video quality of a candidate against a reference: PSNR and SSIM per frame.

Both take uint8 RGB frames ``[T, H, W, 3]`` (what the decoder gives and what ``--save-frames`` writes)
and are computed in float64 with numpy, one frame at a time.

* PSNR over the three RGB channels of a frame: ``10 log10(255^2 / MSE)``; identical frames give +inf.
  The whole video's PSNR comes from the mean MSE over its frames (see ``VideoQuality``).
* SSIM as Wang, Bovik, Sheikh and Simoncelli (IEEE TIP 2004): an 11x11 Gaussian window with
  sigma 1.5, K1 = 0.01, K2 = 0.03, dynamic range L = 255, population (not sample) statistics, the
  mean of the SSIM map over the positions where the whole window fits inside the frame. It runs on
  luma (BT.601: Y = 0.299 R + 0.587 G + 0.114 B, unrounded), as the paper defines it on grey-level
  images: structure is judged where the eye judges it, and the H.264 (yuv420p) files being compared
  carry chroma at half resolution, which a per-RGB-channel SSIM would mix into every channel.

These equal scikit-image's ``peak_signal_noise_ratio(data_range=255)`` and ``structural_similarity(
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)`` on the same luma
(the tests hold reference values computed with it); scikit-image is not a dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601


def luma(frame: np.ndarray) -> np.ndarray:
    """BT.601 luma of uint8 RGB ``[..., 3]`` as float64, unrounded."""
    return np.asarray(frame, dtype=np.float64) @ np.asarray(LUMA_WEIGHTS)


def psnr(reference: np.ndarray, candidate: np.ndarray) -> float:
    """PSNR in dB of one frame (any shape, uint8 values); +inf when the frames are identical."""
    return _db(mse(reference, candidate))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D normalised Gaussian taps; the 2-D window is their outer product (separable)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-(x * x) / (2 * sigma * sigma))
    return taps / taps.sum()


def _filter_valid(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation of a 2-D image with ``taps`` along both axes, 'valid' region only."""
    n = len(taps)
    h, w = image.shape
    rows = sum(taps[k] * image[k : h - n + 1 + k, :] for k in range(n))
    return sum(taps[k] * rows[:, k : w - n + 1 + k] for k in range(n))


def ssim(reference: np.ndarray, candidate: np.ndarray) -> float:
    """SSIM of two single-channel float images of the same shape (both at least 11 x 11)."""
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(candidate, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"ssim needs two 2-D images of one shape, got {x.shape} and {y.shape}")
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {x.shape}")
    taps = gaussian_window()
    mu_x, mu_y = _filter_valid(x, taps), _filter_valid(y, taps)
    var_x = _filter_valid(x * x, taps) - mu_x * mu_x
    var_y = _filter_valid(y * y, taps) - mu_y * mu_y
    cov = _filter_valid(x * y, taps) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


@dataclass(frozen=True)
class FrameScores:
    """One metric over a video (higher is better): every frame's value and the worst frame."""

    per_frame: tuple[float, ...]

    @property
    def worst_frame(self) -> int:
        return int(np.argmin(self.per_frame))

    @property
    def worst(self) -> float:
        return self.per_frame[self.worst_frame]

    @property
    def mean(self) -> float:
        return math.fsum(self.per_frame) / len(self.per_frame)


@dataclass(frozen=True)
class VideoQuality:
    """PSNR and SSIM of a candidate video against a reference.

    The video's PSNR is taken from the mean squared error over all frames (what ffmpeg's psnr filter
    reports as its average), not as the mean of per-frame dB values: that mean is infinite as soon as one
    frame is identical, and ti2v-5B's image-conditioned first frame always is. SSIM is the mean over frames.
    """

    frames: int
    width: int
    height: int
    mse: tuple[float, ...]  # per frame, over RGB
    ssim: FrameScores

    @property
    def psnr_db(self) -> FrameScores:
        return FrameScores(tuple(_db(m) for m in self.mse))

    @property
    def video_psnr_db(self) -> float:
        return _db(math.fsum(self.mse) / len(self.mse))

    def to_json(self) -> dict:
        """Rounded values (PSNR 4 decimals, SSIM 6); an infinite PSNR (identical frames) becomes null."""

        def db(value: float) -> float | None:
            return round(value, 4) if math.isfinite(value) else None

        psnr_db = self.psnr_db
        return {
            "frames": self.frames,
            "size_wh": [self.width, self.height],
            "psnr_db": {
                "video": db(self.video_psnr_db),
                "worst": db(psnr_db.worst),
                "worst_frame": psnr_db.worst_frame,
                "per_frame": [db(v) for v in psnr_db.per_frame],
            },
            "ssim": {
                "mean": round(self.ssim.mean, 6),
                "worst": round(self.ssim.worst, 6),
                "worst_frame": self.ssim.worst_frame,
                "per_frame": [round(v, 6) for v in self.ssim.per_frame],
            },
            "method": QUALITY_METHOD,
        }


QUALITY_METHOD = (
    "PSNR over RGB, per frame and for the whole video (from the mean MSE over frames); null = identical "
    "(infinite). SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, L 255) on BT.601 "
    "luma per frame, mean over frames. Worst = lowest value; frames count from 0"
)


def summary_line(quality: dict) -> str:
    """One human line from ``VideoQuality.to_json()``: whole-video PSNR, mean SSIM, and their worst frames."""
    psnr, ssim = quality["psnr_db"], quality["ssim"]

    def db(value: float | None) -> str:
        return "inf (identical)" if value is None else f"{value:.2f} dB"

    return (
        f"PSNR {db(psnr['video'])}, worst frame {psnr['worst_frame']} {db(psnr['worst'])}; "
        f"SSIM mean {ssim['mean']:.4f}, worst frame {ssim['worst_frame']} {ssim['worst']:.4f}"
    )


def _db(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(DATA_RANGE**2 / mse)


def mse(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean squared error of two frames (any shape, uint8 values), in float64."""
    diff = np.asarray(reference, dtype=np.float64) - np.asarray(candidate, dtype=np.float64)
    return float(np.mean(diff * diff))


def video_quality(reference: np.ndarray, candidate: np.ndarray) -> VideoQuality:
    """PSNR and SSIM of every frame of ``candidate`` against ``reference`` (uint8 ``[T, H, W, 3]``)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"videos differ in shape: {reference.shape} vs {candidate.shape}")
    if reference.ndim != 4 or reference.shape[-1] != 3 or reference.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3] with T >= 1, got {list(reference.shape)}")
    errors = tuple(mse(a, b) for a, b in zip(reference, candidate, strict=True))
    ssims = tuple(ssim(luma(a), luma(b)) for a, b in zip(reference, candidate, strict=True))
    t, h, w, _ = reference.shape
    return VideoQuality(t, w, h, errors, FrameScores(ssims))
