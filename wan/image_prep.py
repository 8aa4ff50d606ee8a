"""Conditioning-image preprocessing, exactly as the official pipelines do it.

i2v-A14B: the image keeps its aspect ratio inside the pixel budget `max_area`, rounded to the latent
grid, and is resized with bicubic `F.interpolate` (no antialias, no clamp, no crop).
ti2v-5B: the output size is the best multiple-of-32 fit of the image's aspect ratio inside
`max_area`; the image is LANCZOS-resized to cover it, then centre-cropped.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 [3, H, W] in [-1, 1] (torchvision to_tensor, then (x - 0.5) / 0.5)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


def i2v_latent_size(
    width: int, height: int, max_area: int, stride: int = 8, patch: int = 2
) -> tuple[int, int]:
    """(lat_h, lat_w) for i2v-A14B: sqrt(max_area * h/w) // stride // patch * patch, rounded (upstream)."""
    aspect = height / width
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    return lat_h, lat_w


def i2v_first_frame(image: Image.Image, max_area: int, stride: int = 8, patch: int = 2) -> torch.Tensor:
    """The first frame for i2v-A14B: float32 [3, h, w] in about [-1, 1] (bicubic overshoot kept)."""
    pixels = to_tensor(image)
    lat_h, lat_w = i2v_latent_size(pixels.shape[2], pixels.shape[1], max_area, stride, patch)
    return F.interpolate(pixels[None], size=(lat_h * stride, lat_w * stride), mode="bicubic")[0]


def best_output_size(
    width: int, height: int, multiple_w: int, multiple_h: int, max_area: int
) -> tuple[int, int]:
    """(out_w, out_h): multiples of the given sizes, area <= max_area, aspect closest to the image's.

    Tries "width first" and "height first" roundings and keeps the one with the smaller ratio error,
    preferring height-first on ties (upstream's order).
    """
    ratio = width / height
    ow = math.sqrt(max_area * ratio)
    oh = max_area / ow
    ow1 = int(ow // multiple_w * multiple_w)
    oh1 = int(max_area / ow1 // multiple_h * multiple_h)
    oh2 = int(oh // multiple_h * multiple_h)
    ow2 = int(max_area / oh2 // multiple_w * multiple_w)

    def error(w: int, h: int) -> float:
        return max(ratio / (w / h), (w / h) / ratio)

    return (ow1, oh1) if error(ow1, oh1) < error(ow2, oh2) else (ow2, oh2)


def ti2v_first_frame(image: Image.Image, max_area: int, multiple: int = 32) -> torch.Tensor:
    """The first frame for ti2v-5B: LANCZOS cover-resize, centre crop; float32 [3, h, w] in [-1, 1]."""
    image = image.convert("RGB")
    out_w, out_h = best_output_size(image.width, image.height, multiple, multiple, max_area)
    scale = max(out_w / image.width, out_h / image.height)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    left, top = (resized.width - out_w) // 2, (resized.height - out_h) // 2
    return to_tensor(resized.crop((left, top, left + out_w, top + out_h)))
