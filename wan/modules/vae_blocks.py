"""Building blocks shared by the Wan2.1 and Wan2.2 video VAEs.

Every temporal convolution is causal (zero padding at the front only) and streams: a clip goes
through the network chunk by chunk, and each causal conv keeps the last ``CACHE_FRAMES`` frames of
its input in a ``StreamCache`` that belongs to one encode or decode call. Chunks follow upstream
(encode: frame 0, then 4 frames; decode: one latent frame), so results match upstream while the
activations only ever hold one chunk. Parameter names match the official state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

CACHE_FRAMES = 2  # a 3-tap causal kernel needs the two frames before the chunk


class StreamCache:
    """Streaming state of one encode or decode call, keyed by module: trailing input frames."""

    def __init__(self) -> None:
        self._frames: dict[nn.Module, torch.Tensor | None] = {}

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._frames

    def get(self, module: nn.Module) -> torch.Tensor | None:
        return self._frames.get(module)

    def put(self, module: nn.Module, frames: torch.Tensor | None) -> None:
        self._frames[module] = frames


def trailing_frames(history: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The last CACHE_FRAMES frames of the stream ``history + x``; cloned so no chunk stays alive."""
    if x.shape[2] >= CACHE_FRAMES or history is None:
        return x[:, :, -CACHE_FRAMES:].clone()
    return torch.cat([history[:, :, x.shape[2] - CACHE_FRAMES :], x], dim=2)


class CausalConv3d(nn.Conv3d):
    """Conv3d whose time axis is padded with ``2 * padding_t`` frames at the front only.

    Given a cache, the zero frames are replaced by the previous chunk's trailing input frames, so a
    clip fed in chunks gives the same output as the whole clip at once.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        padding: int | tuple[int, int, int] = 0,
        stride: int | tuple[int, int, int] = 1,
    ) -> None:
        pad_t, pad_h, pad_w = padding if isinstance(padding, tuple) else (padding,) * 3
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.front_frames = 2 * pad_t

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # PyTorch sends small-channel CPU conv3d (tiny test and demo VAEs) to a slow im2col kernel; the
        # oneDNN kernel it picks for real widths is several times faster and as accurate.
        if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            return torch.mkldnn_convolution(
                x, weight, bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super()._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self.forward_owned([x], cache)

    def forward_owned(self, held: list[torch.Tensor], cache: StreamCache | None = None) -> torch.Tensor:
        """`forward(held.pop(), cache)`, dropping the input once it is padded: when the caller keeps
        no other reference, the input and the conv output never coexist (at full resolution each is
        a few hundred MB, and the encode's peak is a handful of them)."""
        x = held.pop()
        if self.front_frames == 0:
            return super().forward(x)
        history = None
        if cache is not None:
            history = cache.get(self)
            cache.put(self, trailing_frames(history, x))
        pieces = [x] if history is None else [history, x]
        missing = self.front_frames - (0 if history is None else history.shape[2])
        if missing > 0:
            pieces.insert(0, x.new_zeros(*x.shape[:2], missing, *x.shape[3:]))
        padded = torch.cat(pieces, dim=2)
        del x, pieces
        return super().forward(padded)


class ChannelL2Norm(nn.Module):
    """Upstream ``RMS_norm``: L2-normalise over channels (eps 1e-12) times sqrt(C) times gamma.

    Not a mean-square norm with eps: for tiny activations it differs, so this must stay an L2 norm.
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.normalize(x, dim=1)
        if self.gamma.dtype != out.dtype:  # out of place: the product promotes, as upstream's does
            return out * self.scale * self.gamma
        # in place on the fresh normalised tensor: the same products in the same order, one
        # full-resolution temporary fewer (the encode's peak is a few of these)
        return out.mul_(self.scale).mul_(self.gamma)


def frames_as_images(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of a [B, C, T, H, W] video."""
    b, _, t = x.shape[:3]
    images = fn(x.transpose(1, 2).flatten(0, 1))
    return images.unflatten(0, (b, t)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """norm, SiLU, 3x3x3 causal conv, norm, SiLU, (dropout slot), 3x3x3 causal conv, plus shortcut."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Index 5 is upstream's dropout (0.0 at inference); kept so the conv keys stay `residual.6`.
        self.residual = nn.Sequential(
            ChannelL2Norm(in_dim),
            nn.SiLU(inplace=True),  # on the norm's fresh output
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelL2Norm(out_dim),
            nn.SiLU(inplace=True),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.shortcut(x)
        y = x
        for layer in self.residual:
            if isinstance(layer, CausalConv3d):  # hand it the only reference to its input
                held = [y]
                del y
                y = layer.forward_owned(held, cache)
            else:
                y = layer(y)
        return y.add_(h)  # y is the last conv's fresh output: in place, the same sum as y + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = ChannelL2Norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        qkv = self.to_qkv(self.norm(images)).flatten(2).transpose(1, 2).unsqueeze(1)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return x + frames_as_images(self.attend, x)


def middle_blocks(dim: int) -> nn.Sequential:
    """The bottleneck: residual block, attention, residual block (keys `middle.0/1/2`)."""
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class OutputHead(nn.Sequential):
    """norm, SiLU, 3x3x3 causal conv to ``out_dim`` channels (keys `head.0`, `head.2`)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__(ChannelL2Norm(dim), nn.SiLU(inplace=True), CausalConv3d(dim, out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        return self[2](self[1](self[0](x)), cache)


class NearestUpsample2x(nn.Module):
    """x2 nearest-exact spatial upsampling, computed in float32 (upstream's bf16 workaround)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """Spatial x2 down/up-sampling per frame, optionally with a temporal x2 (``*3d`` modes).

    ``out_dim`` is the width after an upsampling conv (Wan2.1 halves it, Wan2.2 keeps it).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
        else:
            # Asymmetric zero pad (right, bottom) before the stride-2 conv, as upstream.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            x = self.upsample_time(x, cache)
        x = frames_as_images(self.resample, x)
        if self.mode == "downsample3d" and cache is not None:
            x = self.downsample_time(x, cache)
        return x

    def upsample_time(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        if self not in cache:
            # Upstream quirk ('Rep'): the first chunk is not upsampled in time (1 frame -> 1 frame),
            # and the time conv's stream starts at the second chunk with zero history.
            cache.put(self, None)
            return x
        b, c, t, h, w = x.shape
        doubled = self.time_conv(x, cache)
        # Channel halves are the two output frames of each input frame, interleaved in time.
        return doubled.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def downsample_time(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        first_chunk = self not in cache
        previous = cache.get(self)
        cache.put(self, x[:, :, -1:].clone())
        if first_chunk:
            # Upstream quirk: the first chunk (frame 0 alone) skips the stride-2 time conv.
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


def encode_in_chunks(
    encoder: Callable[[torch.Tensor, StreamCache], torch.Tensor],
    video: torch.Tensor,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Run ``encoder`` on frame 0 alone, then on 4-frame chunks, sharing one StreamCache. Each chunk
    is moved to `device`/`dtype` when it is encoded: the clip itself may stay in host memory."""
    cache = StreamCache()
    bounds = [(0, 1)] + [(s, s + 4) for s in range(1, video.shape[2], 4)]
    return torch.cat([encoder(video[:, :, s:e].to(device, dtype), cache) for s, e in bounds], dim=2)


def decode_in_chunks(
    decoder: Callable[[torch.Tensor, StreamCache, bool], torch.Tensor], latents: torch.Tensor
) -> torch.Tensor:
    """Run ``decoder`` one latent frame at a time, sharing one StreamCache, into one output tensor."""
    cache = StreamCache()
    num_latent = latents.shape[2]
    first = decoder(latents[:, :, :1], cache, True)
    if num_latent == 1:
        return first
    out = None
    pos = first.shape[2]
    for i in range(1, num_latent):
        frames = decoder(latents[:, :, i : i + 1], cache, False)
        if out is None:
            # Preallocate once the per-chunk frame count is known, instead of growing by concatenation.
            total = first.shape[2] + (num_latent - 1) * frames.shape[2]
            out = first.new_empty(*first.shape[:2], total, *first.shape[3:])
            out[:, :, :pos] = first
            del first
        out[:, :, pos : pos + frames.shape[2]] = frames
        pos += frames.shape[2]
    return out
