"""The Wan2.2 video VAE (z 48, stride 4x16x16), used by ti2v-5B.

Differences from Wan2.1: pixels are 2x2-unshuffled to 12 channels before the encoder (and the
decoder emits 12 channels that are shuffled back); every stage adds a parameter-free shortcut that
moves space/time into channels (``AvgDown3D``) or back (``DupUp3D``); the decoder has its own width
(official: encoder 160, decoder 256) and its upsampling convs keep the width.
"""

from __future__ import annotations

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
PATCH = 2

# Official per-channel latent statistics (Wan2_2_VAE); latents are (mu - mean) / std.
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


def patchify(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, 2h, 2w] -> [B, 4C, T, h, w]; channel = c*4 + col_offset*2 + row_offset (upstream order)."""
    b, c, t, h, w = video.shape
    x = video.view(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``patchify``: [B, 4C, T, h, w] -> [B, C, T, 2h, 2w]."""
    b, c4, t, h, w = x.shape
    x = x.view(b, c4 // (PATCH * PATCH), PATCH, PATCH, t, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), t, h * PATCH, w * PATCH)


class AvgDown3D(nn.Module):
    """Shortcut of a down stage: fold (t, y, x) blocks into channels, then average channel groups."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.group_size = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        front = (ft - x.shape[2] % ft) % ft
        if front:
            # Zero frames in front make the length a multiple of factor_t (frame 0 averages with zeros).
            x = torch.cat([x.new_zeros(*x.shape[:2], front, *x.shape[3:]), x], dim=2)
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_dim, self.group_size, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Shortcut of an up stage: repeat channels, then unfold them into (t, y, x) blocks."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        # Upstream: latent frame 0 decodes to one frame, so its first factor_t - 1 copies are dropped.
        return x[:, :, ft - 1 :] if first_chunk else x


class DownStage(nn.Module):
    """Upstream ``Down_ResidualBlock``: residual blocks, optional resample, AvgDown3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if spatial else 1)
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if spatial:
            blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        shortcut = self.avg_shortcut(x)
        for block in self.downsamples:
            x = block(x, cache)
        return x + shortcut


class UpStage(nn.Module):
    """Upstream ``Up_ResidualBlock``: residual blocks, optional resample, DupUp3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None
        blocks: list[nn.Module] = []
        for _ in range(num_res_blocks):
            blocks.append(ResidualBlock(in_dim, out_dim))
            in_dim = out_dim
        if spatial:
            blocks.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: StreamCache, first_chunk: bool) -> torch.Tensor:
        main = x
        for block in self.upsamples:
            main = block(main, cache)
        if self.avg_shortcut is None:
            return main
        return main + self.avg_shortcut(x, first_chunk)


def _stage_flags(stage: int) -> tuple[bool, bool]:
    """(temporal, spatial) resampling of a stage; the last stage keeps the resolution."""
    spatial = stage < len(DIM_MULT) - 1
    return (TEMPORAL_DOWNSAMPLE[stage] if spatial else False), spatial


class Encoder(nn.Module):
    def __init__(self, dim: int, out_dim: int, num_res_blocks: int) -> None:
        super().__init__()
        widths = [dim * m for m in (1, *DIM_MULT)]
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, widths[0], 3, padding=1)
        self.downsamples = nn.Sequential(
            *(
                DownStage(widths[i], widths[i + 1], num_res_blocks, *_stage_flags(i))
                for i in range(len(DIM_MULT))
            )
        )
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
        stages = []
        for i in range(len(DIM_MULT)):
            spatial = i < len(DIM_MULT) - 1
            temporal = TEMPORAL_UPSAMPLE[i] if spatial else False
            stages.append(UpStage(widths[i], widths[i + 1], num_res_blocks + 1, temporal, spatial))
        self.upsamples = nn.Sequential(*stages)
        self.head = OutputHead(widths[-1], 3 * PATCH * PATCH)

    def stem(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """conv1 and the middle blocks, at latent resolution (holds the only frame-global op)."""
        x = self.conv1(x, cache)
        for block in self.middle:
            x = block(x, cache)
        return x

    def body(self, x: torch.Tensor, cache: StreamCache, first_chunk: bool = False) -> torch.Tensor:
        """The upsampling stages and the head: stem features -> 12-channel patches."""
        for stage in self.upsamples:
            x = stage(x, cache, first_chunk)
        return self.head(x, cache)

    def forward(self, x: torch.Tensor, cache: StreamCache, first_chunk: bool = False) -> torch.Tensor:
        return self.body(self.stem(x, cache), cache, first_chunk)


class WanVAE22(nn.Module):
    """Wan2.2 VAE: ``encode`` gives the un-normalised mean latent, ``decode`` unclamped pixels."""

    kind = "2.2"
    stride = (4, 16, 16)
    video_channels = 3

    def __init__(self, dim: int = 160, dec_dim: int = 256, z_dim: int = 48, num_res_blocks: int = 2) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder(dim, z_dim * 2, num_res_blocks)
        self.conv1 = nn.Conv3d(z_dim * 2, z_dim * 2, 1)  # upstream CausalConv3d with a 1x1x1 kernel
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)
        self.decoder = Decoder(dec_dim, z_dim, num_res_blocks)

    def encode(
        self, video: torch.Tensor, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> mu [B, z, 1+k, H/16, W/16] (log-variance discarded); the
        video's chunks are moved to `device`/`dtype` one at a time."""
        return self.conv1(encode_in_chunks(self.encoder, patchify(video), device, dtype))[:, : self.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z, T, h, w] un-normalised latents -> [B, 3, 1+4(T-1), 16h, 16w], not clamped."""
        return unpatchify(decode_in_chunks(self.decoder, self.conv2(z)))

    def decode_stem(self, z: torch.Tensor) -> torch.Tensor:
        """First half of ``decode``: latent-resolution decoder features of every latent frame."""
        return decode_in_chunks(lambda x, cache, first: self.decoder.stem(x, cache), self.conv2(z))

    def decode_body(self, features: torch.Tensor) -> torch.Tensor:
        """Second half of ``decode``; spatial crops of the features decode to crops of the video."""
        return unpatchify(decode_in_chunks(self.decoder.body, features))
