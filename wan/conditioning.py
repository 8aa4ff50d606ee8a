"""Per-task conditioning as data: what the shared sampling loop needs beyond noise and text.

- t2v-A14B: nothing.
- i2v-A14B: `y` = [4-channel first-frame mask | VAE latent of (image, zero frames)], concatenated to
  the model input after the noise, identical in the cond and uncond passes.
- ti2v-5B with an image: the first latent frame is the image latent, imposed on the initial noise and
  re-imposed after every solver step; its tokens get timestep 0. The per-token timesteps are built
  from the latent shape as TokenTimesteps (values [0, t] and a token index), so the model never has to
  read timestep values on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wan.modules.transformer import TokenTimesteps


@dataclass(frozen=True)
class Conditioning:
    y: torch.Tensor | None = None  # i2v: [B, 20, T, H, W]
    first_frame: torch.Tensor | None = None  # ti2v image mode: normalised latent [B, z, 1, H, W]
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def impose(self, latent: torch.Tensor) -> torch.Tensor:
        """Re-impose the known first frame (ti2v image mode), as upstream's (1 - mask) * z + mask * x."""
        if self.first_frame is None:
            return latent
        mask = first_frame_mask(latent)
        return (1.0 - mask) * self.first_frame + mask * latent

    def model_timestep(self, t: int | float, latent: torch.Tensor) -> torch.Tensor | TokenTimesteps:
        """The `t` given to the DiT: [B] int64 (float32 for a float `t`, the Euler schedule), or (ti2v
        image mode) TokenTimesteps with values [[0, t]] per sample and frame-0 tokens on value 0
        (upstream's per-token `mask * t`).

        Built with device-side fills only: no host-device copy, no synchronisation.
        """
        b, device = latent.shape[0], latent.device
        if self.first_frame is None:
            dtype = torch.float32 if isinstance(t, float) else torch.int64
            return torch.full((b,), t, dtype=dtype, device=device)
        pt, ph, pw = self.patch_size
        frames, height, width = latent.shape[2:]
        first = (height // ph) * (width // pw)  # tokens of latent frame 0 (pt is 1 for every task)
        tokens = -(-frames // pt) * first
        values = torch.full((b, 2), t, dtype=torch.float32, device=device)
        values[:, 0] = 0.0
        index = torch.ones((b, tokens), dtype=torch.int64, device=device)
        index[:, :first] = 0
        return TokenTimesteps(values=values, index=index)


def first_frame_mask(latent: torch.Tensor) -> torch.Tensor:
    """0 on latent frame 0, 1 elsewhere (upstream masks_like(zero=True)), shaped like latent."""
    mask = torch.ones_like(latent)
    mask[:, :, 0] = 0.0
    return mask


def i2v_mask(frame_num: int, lat_h: int, lat_w: int, temporal_stride: int = 4) -> torch.Tensor:
    """The 4-channel i2v mask [4, T_lat, lat_h, lat_w]: ones on latent frame 0, zeros elsewhere.

    Upstream builds it per pixel frame (frame 0 repeated 4 times, then regrouped by 4); the result
    is exactly this.
    """
    t_lat = (frame_num - 1) // temporal_stride + 1
    mask = torch.zeros(temporal_stride, t_lat, lat_h, lat_w)
    mask[:, 0] = 1.0
    return mask


def i2v_video(first_frame: torch.Tensor, frame_num: int) -> torch.Tensor:
    """[3, F, h, w]: the resized first frame followed by F-1 zero frames (what upstream VAE-encodes)."""
    c, h, w = first_frame.shape
    zeros = torch.zeros(c, frame_num - 1, h, w, dtype=first_frame.dtype, device=first_frame.device)
    return torch.cat([first_frame[:, None], zeros], dim=1)
