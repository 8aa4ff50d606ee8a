"""Loading the Wan VAEs from their official files, and the user-facing ``WanVAE`` wrapper.

``load_vae`` reads ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` (or a ``.safetensors`` with the same keys),
tells the kind and widths from the keys and shapes (there is no config file), builds the model on
the meta device and assigns the tensors with strict key checking. ``WanVAE.decode(tiled=True)``
runs the memory-hungry upsampling stages on overlapping spatial tiles one at a time and blends them,
bounding peak memory by the tile size instead of the frame size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wan.checkpoint_reader import VAE_MARKER_KEYS, ReadError, identify, map_threaded, open_tensors, vae_kind
from wan.errors import CheckpointError, CheckpointNotFoundError
from wan.modules import vae_2_1, vae_2_2
from wan.weight_files import official_getter
from wan.weight_formats import FormatError, vae_layout

__all__ = ["CheckpointError", "CheckpointNotFoundError", "VaeConfig", "WanVAE", "load_vae"]

DEFAULT_TILE_PIXELS = 256  # default tile edge in pixels; the overlap defaults to a quarter of the tile


@dataclass(frozen=True)
class VaeConfig:
    """What tells the VAEs apart, as read off a state dict."""

    kind: str  # "2.1" | "2.2"
    dim: int
    dec_dim: int
    z_dim: int
    num_res_blocks: int

    def build(self) -> nn.Module:
        if self.kind == "2.1":
            return vae_2_1.WanVAE21(self.dim, self.z_dim, self.num_res_blocks)
        return vae_2_2.WanVAE22(self.dim, self.dec_dim, self.z_dim, self.num_res_blocks)


# ----------------------------------------------------------------------------------------------------
# Reading and checking a state dict
# ----------------------------------------------------------------------------------------------------

_FIX = "pass the official Wan2.1_VAE.pth or Wan2.2_VAE.pth"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` (torch.save'd state dict, read with weights_only) or ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"VAE checkpoint {path} is a folder; pass the VAE file inside it (Wan2.1_VAE.pth or Wan2.2_VAE.pth)"
        )
    if not path.is_file():
        raise CheckpointNotFoundError(f"VAE checkpoint {path} does not exist; {_FIX} (check the path)")
    # Only a damaged file is worth downloading again: the reader finds truncation and corruption from
    # the header or pickle; anything else (out of memory, a permission problem) propagates as itself.
    try:
        with open_tensors(path) as (table, get):
            # official names, markers dropped, float8 weights dequantised (wan.weight_formats)
            layout = vae_layout(table)
            get_official = official_getter(layout, get)
            state = {key: get_official(key) for key in layout.sources}
    except ReadError as err:
        raise CheckpointError(f"VAE checkpoint {path} {err}; download it again ({_FIX})") from None
    except FormatError as err:
        raise CheckpointError(f"VAE checkpoint {path} {err}") from None
    return state


def vae_config_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> VaeConfig:
    """Tell the VAE kind and widths from the keys and shapes; raises CheckpointError if not a VAE."""
    for marker in VAE_MARKER_KEYS:
        if marker not in state:
            found = identify(state)
            what = f"it looks like {found}" if found else f"key '{marker}' is missing"
            raise CheckpointError(f"{source} is not a Wan VAE checkpoint ({what}); {_FIX}")
    kind = vae_kind(state)
    dim = state["encoder.conv1.weight"].shape[0]
    head = state.get("decoder.head.2.weight")
    dec_dim = head.shape[1] if head is not None and head.dim() == 5 else dim
    num_res_blocks = _first_stage_res_blocks(state, kind)
    return VaeConfig(kind, dim, dec_dim, state["conv2.weight"].shape[0], num_res_blocks)


def _first_stage_res_blocks(state: dict[str, torch.Tensor], kind: str) -> int:
    """Residual blocks per encoder stage, counted in the first stage."""
    if kind == "2.2":
        prefix = "encoder.downsamples.0.downsamples."
        return len({k.split(".")[4] for k in state if k.startswith(prefix) and ".residual." in k})
    # Wan2.1 keeps all encoder blocks in one list: the first resample's index is the block count.
    resamples = [
        int(k.split(".")[2]) for k in state if k.startswith("encoder.downsamples.") and ".resample." in k
    ]
    return min(resamples, default=2)


def check_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], config: VaeConfig, source: str
) -> None:
    """Name the first missing, unexpected or mis-shaped key before load_state_dict would."""
    expected = model.state_dict()
    described = f"a Wan{config.kind} VAE (dim {config.dim}, z_dim {config.z_dim})"
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{source}: key '{missing[0]}' is missing ({len(missing)} missing keys) for {described}; "
            f"the file is incomplete or not an official VAE, {_FIX}"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected keys) for "
            f"{described}; {_FIX}"
        )
    for key, param in expected.items():
        if state[key].shape != param.shape:
            raise CheckpointError(
                f"{source}: key '{key}' has shape {list(state[key].shape)}, expected {list(param.shape)} "
                f"for {described}; {_FIX}"
            )


def vae_from_state_dict(
    state: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "state dict",
) -> WanVAE:
    """Build the VAE on the meta device and assign ``state`` (official keys, strict)."""
    config = vae_config_from_state_dict(state, source)
    with torch.device("meta"):
        model = config.build()
    check_state_dict(model, state, config, source)
    # cast (from the file's map) on a few threads, as model.to would do on one
    casts = map_threaded(
        lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device),
        list(state.values()),
    )
    model.load_state_dict(dict(zip(state, casts, strict=True)), strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return WanVAE(model)


def load_vae(
    path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` or ``Wan2.2_VAE.pth`` (or a ``.safetensors`` with the same keys)."""
    return vae_from_state_dict(
        read_state_dict(path), dtype=dtype, device=device, source=f"VAE checkpoint {path}"
    )


# ----------------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------------


class WanVAE:
    """A loaded Wan VAE: ``encode`` video in [-1, 1] to normalised latents, ``decode`` back.

    Both work on batches ([B, C, T, H, W]), run without autograd and outside any autocast (upstream
    runs its VAEs in float32 even inside the bf16 sampling region), and return float32.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kind: str = model.kind
        self.z_dim: int = model.z_dim
        self.stride: tuple[int, int, int] = model.stride
        stats = vae_2_1 if self.kind == "2.1" else vae_2_2
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.mean = torch.tensor(stats.LATENT_MEAN, dtype=torch.float32, device=self.device).view(
            1, -1, 1, 1, 1
        )
        # Upstream keeps 1/std and divides by it on decode; kept so the float32 rounding matches.
        self.inv_std = (1.0 / torch.tensor(stats.LATENT_STD, dtype=torch.float32, device=self.device)).view(
            1, -1, 1, 1, 1
        )

    def __repr__(self) -> str:
        return f"WanVAE(kind={self.kind!r}, z_dim={self.z_dim}, stride={self.stride}, dtype={self.dtype})"

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents [B, z, 1+k, H/s, W/s] (s = 8 or 16)."""
        st, ss = self.stride[0], self.stride[1]
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects video [B, 3, T, H, W], got shape {list(video.shape)}")
        _, _, t, h, w = video.shape
        if t % st != 1 or h % ss or w % ss:
            raise ValueError(
                f"encode needs 1+{st}k frames and H, W divisible by {ss} for the Wan{self.kind} VAE, "
                f"got T={t}, H={h}, W={w}"
            )
        with torch.autocast(self.device.type, enabled=False):
            mu = self.model.encode(video, self.device, self.dtype).float()  # chunk by chunk to the device
        return (mu - self.mean) * self.inv_std

    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiled: bool = False,
        tile_size: int | tuple[int, int] | None = None,
        tile_overlap: int | tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """[B, z, T, h, w] normalised latents -> video [B, 3, 1+4(T-1), h*s, w*s] in [-1, 1], float32.

        ``tiled=True`` bounds memory for large frames: the latent-resolution stem (conv1 and the
        middle blocks with their frame-global attention) runs on the whole frame, then the
        upsampling stages run on overlapping spatial tiles of ``tile_size`` latent cells (default
        256 px / s) overlapping by ``tile_overlap`` cells (default a quarter of the tile), each tile
        through the full causal time path with its own caches; overlaps are blended linearly. Not
        bit-exact (convolutions see tile borders); untiled is upstream-exact.
        """
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(
                f"decode expects latents [B, {self.z_dim}, T, h, w] for the Wan{self.kind} VAE, "
                f"got shape {list(latents.shape)}"
            )
        z = latents.to(self.device, torch.float32) / self.inv_std + self.mean
        with torch.autocast(self.device.type, enabled=False):
            if tiled:
                video = self._decode_tiled(z, tile_size, tile_overlap)
            else:
                video = self.model.decode(z.to(self.dtype)).float()
        return video.clamp_(-1, 1)

    def _decode_tiled(
        self,
        z: torch.Tensor,
        tile_size: int | tuple[int, int] | None,
        tile_overlap: int | tuple[int, int] | None,
    ) -> torch.Tensor:
        scale = self.stride[1]
        size = _pair(tile_size if tile_size is not None else DEFAULT_TILE_PIXELS // scale)
        overlap = _pair(tile_overlap if tile_overlap is not None else (size[0] // 4, size[1] // 4))
        for s, o in zip(size, overlap, strict=True):
            if s < 1 or not 0 <= o < s:
                raise ValueError(
                    f"tile_size {size} must be >= 1 and tile_overlap {overlap} in [0, tile_size)"
                )
        # The latent-resolution stem (incl. the frame-global attention) runs untiled and is kept for
        # the whole clip (small); only the upsampling stages, where the memory goes, run per tile.
        features = self.model.decode_stem(z.to(self.dtype))
        rows = tile_spans(z.shape[3], size[0], overlap[0])
        cols = tile_spans(z.shape[4], size[1], overlap[1])
        out = weight_sum = None
        for top, bottom in rows:
            ramp_y = blend_ramp(rows, (top, bottom), scale, z.device)
            for left, right in cols:
                ramp_x = blend_ramp(cols, (left, right), scale, z.device)
                tile = self.model.decode_body(features[:, :, :, top:bottom, left:right]).float()
                if out is None:
                    b, c, t = tile.shape[:3]
                    out = tile.new_zeros(b, c, t, z.shape[3] * scale, z.shape[4] * scale)
                    weight_sum = tile.new_zeros(z.shape[3] * scale, z.shape[4] * scale)
                weight = ramp_y[:, None] * ramp_x[None, :]
                ys, xs = slice(top * scale, bottom * scale), slice(left * scale, right * scale)
                out[:, :, :, ys, xs] += tile * weight
                weight_sum[ys, xs] += weight
                del tile
        return out.div_(weight_sum)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) spans of ``tile`` latent cells covering ``length``, spread evenly so that
    neighbours overlap by at least ``overlap`` cells and the last span ends at ``length``."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    starts = [i * (length - tile) // (count - 1) for i in range(count)]
    return [(s, s + tile) for s in starts]


def blend_ramp(
    spans: list[tuple[int, int]], span: tuple[int, int], scale: int, device: torch.device
) -> torch.Tensor:
    """Per-pixel blend weight of one tile along one axis: linear ramps across its shared edges.

    Where two tiles overlap their ramps add up to one, so seams fade linearly from one tile to the
    next; a tile edge on the frame border keeps full weight.
    """
    start, end = span
    i = spans.index(span)
    weight = torch.ones((end - start) * scale, device=device)
    if i > 0:
        lead = (spans[i - 1][1] - start) * scale
        weight[:lead] = (torch.arange(lead, device=device) + 0.5) / lead
    if i < len(spans) - 1:
        trail = (end - spans[i + 1][0]) * scale
        weight[weight.numel() - trail :] *= (torch.arange(trail, 0, -1, device=device) - 0.5) / trail
    return weight
