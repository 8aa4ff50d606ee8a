"""The Wan2.1 video VAE (z 16, stride 4x8x8), used by t2v-A14B and i2v-A14B.

Official widths: dim 96, dim_mult (1, 2, 4, 4), 2 residual blocks per encoder stage (3 per decoder
stage), temporal downsampling in the last two stages. The decoder's upsampling convs halve the
width, so each decoder stage after the first starts at half the previous stage's width.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from wan.modules.vae_blocks import (
    CausalConv3d,
    OutputHead,
    Resample,
    ResidualBlock,
    StreamCache,
    decode_in_chunks,
    encode_in_chunks,
    middle_blocks,
)

DIM_MULT = (1, 2, 4, 4)
TEMPORAL_DOWNSAMPLE = (False, True, True)
TEMPORAL_UPSAMPLE = TEMPORAL_DOWNSAMPLE[::-1]

# Official per-channel latent statistics (Wan2_1_VAE); latents are (mu - mean) / std.
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


class Encoder(nn.Module):
    def __init__(self, dim: int, out_dim: int, num_res_blocks: int) -> None:
        super().__init__()
        widths = [dim * m for m in (1, *DIM_MULT)]
        self.conv1 = CausalConv3d(3, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for stage, (in_dim, width) in enumerate(pairwise(widths)):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, width))
                in_dim = width
            if stage < len(DIM_MULT) - 1:
                blocks.append(
                    Resample(width, "downsample3d" if TEMPORAL_DOWNSAMPLE[stage] else "downsample2d")
                )
        self.downsamples = nn.Sequential(*blocks)
        self.middle = middle_blocks(widths[-1])
        self.head = OutputHead(widths[-1], out_dim)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for block in (*self.downsamples, *self.middle):
            x = block(x, cache)
        return self.head(x, cache)


class Decoder(nn.Module):
    def __init__(self, dim: int, z_dim: int, num_res_blocks: int) -> None:
        super().__init__()
        widths = [dim * m for m in (DIM_MULT[-1], *DIM_MULT[::-1])]
        self.conv1 = CausalConv3d(z_dim, widths[0], 3, padding=1)
        self.middle = middle_blocks(widths[0])
        blocks: list[nn.Module] = []
        for stage, (in_dim, width) in enumerate(pairwise(widths)):
            if stage > 0:
                in_dim //= 2  # the previous stage's upsampling conv halved the width
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, width))
                in_dim = width
            if stage < len(DIM_MULT) - 1:
                mode = "upsample3d" if TEMPORAL_UPSAMPLE[stage] else "upsample2d"
                blocks.append(Resample(width, mode, out_dim=width // 2))
        self.upsamples = nn.Sequential(*blocks)
        self.head = OutputHead(widths[-1], 3)

    def stem(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """conv1 and the middle blocks, at latent resolution (holds the only frame-global op)."""
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        return x

    def body(self, x: torch.Tensor, cache: StreamCache, first_chunk: bool = False) -> torch.Tensor:
        """The upsampling stages and the head: stem features -> pixels."""
        for block in self.upsamples:
            x = block(x, cache)
        return self.head(x, cache)

    def forward(self, x: torch.Tensor, cache: StreamCache, first_chunk: bool = False) -> torch.Tensor:
        return self.body(self.stem(x, cache), cache, first_chunk)


class WanVAE21(nn.Module):
    """Wan2.1 VAE: ``encode`` gives the un-normalised mean latent, ``decode`` unclamped pixels."""

    kind = "2.1"
    stride = (4, 8, 8)
    video_channels = 3

    def __init__(self, dim: int = 96, z_dim: int = 16, num_res_blocks: int = 2) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(dim, z_dim * 2, num_res_blocks)
        self.conv1 = nn.Conv3d(z_dim * 2, z_dim * 2, 1)  # upstream CausalConv3d with a 1x1x1 kernel
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)
        self.decoder = Decoder(dim, z_dim, num_res_blocks)

    def encode(
        self, video: torch.Tensor, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> mu [B, z, 1+k, H/8, W/8] (log-variance discarded); the
        video's chunks are moved to `device`/`dtype` one at a time."""
        return self.conv1(encode_in_chunks(self.encoder, video, device, dtype))[:, : self.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z, T, h, w] un-normalised latents -> [B, 3, 1+4(T-1), 8h, 8w], not clamped."""
        return decode_in_chunks(self.decoder, self.conv2(z))

    def decode_stem(self, z: torch.Tensor) -> torch.Tensor:
        """First half of ``decode``: latent-resolution decoder features of every latent frame."""
        return decode_in_chunks(lambda x, cache, first: self.decoder.stem(x, cache), self.conv2(z))

    def decode_body(self, features: torch.Tensor) -> torch.Tensor:
        """Second half of ``decode``; spatial crops of the features decode to crops of the video."""
        return decode_in_chunks(self.decoder.body, features)
