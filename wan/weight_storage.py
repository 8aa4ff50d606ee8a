"""The dtype each DiT parameter is stored in: the loader converts every tensor to it on arrival.

Upstream's default regime keeps float32 parameters and runs the forward under bf16 autocast. There,
some parameters are only ever read by an autocast-eligible op (`F.linear`, `F.conv3d`), which casts
them to bf16 on every call: the Linears of every block (self- and cross-attention q, k, v, o, both
FFN Linears) and of the text embedding, and the patch embedding (a conv3d), weights and biases
alike. Storing exactly those in bf16 from the start gives the same values bit for bit (the cast
is the same round-to-nearest-even, done once at load instead of once per call; a LoRA is merged in
float32 before that single rounding), halves their memory on the device and in host RAM, and
saves the per-call cast.

Everything else is read in float32 and stays float32: the block modulation tables and norm weights
(`.float()` and float32 promotion in `wan.modules.block`), the time embedding and projection and
the head Linear (`linear_fp32`: autocast disabled), the head modulation.

Without autocast (CPU runs: plain float32, the goldens' regime) or with `--convert-model-dtype`
(every parameter bf16, upstream's regime b) every parameter takes the run dtype, as before, except
that the Linears the forward reads in float32 (`linear_fp32`: time embedding, time projection, head)
are rounded to the run dtype and then stored widened to float32: the same values upstream's
autocast(float32) regions compute with, cast once at load instead of on every call (the time
projection alone is a 0.63 GB float32 copy at A14B width).
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

# Parameters consumed only by autocast-eligible ops (see the module docstring); official key names.
AUTOCAST_CONSUMED = re.compile(
    r"(?:blocks\.\d+\.(?:self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]|text_embedding\.[02]"
    r"|patch_embedding)\.(?:weight|bias)"
)


# Linears the forward evaluates in float32 whatever their storage (`wan.modules.block.linear_fp32`).
FLOAT32_READ = re.compile(r"(?:time_embedding\.[02]|time_projection\.1|head\.head)\.(?:weight|bias)")


def autocast_consumed(key: str) -> bool:
    """Whether parameter `key` (official name) is read only through an autocast-eligible op."""
    return AUTOCAST_CONSUMED.fullmatch(key) is not None


@dataclass(frozen=True)
class WeightStorage:
    """Storage dtype per parameter of one run.

    `dtype`: the run's parameter dtype (float32, or bf16 with --convert-model-dtype). `autocast`:
    the dtype the forward runs under autocast (bf16 for float32 parameters on CUDA), or None; when
    set, the autocast-consumed parameters are stored in it and everything else in `dtype`.
    """

    dtype: torch.dtype = torch.float32
    autocast: torch.dtype | None = None

    @classmethod
    def for_run(cls, dtype: torch.dtype, device: torch.device) -> WeightStorage:
        """Upstream's regimes: float32 parameters on CUDA run under bf16 autocast; anything else (bf16
        parameters, or a CPU run) runs in the parameter dtype without autocast."""
        autocast = torch.bfloat16 if device.type == "cuda" and dtype == torch.float32 else None
        return cls(dtype, autocast)

    @property
    def mixed(self) -> bool:
        """Whether some parameters are stored in the autocast dtype instead of `dtype`."""
        return self.autocast is not None and self.autocast != self.dtype

    def dtype_of(self, key: str) -> torch.dtype:
        """The storage dtype of parameter `key` (official name, e.g. `blocks.3.ffn.0.weight`)."""
        if self.autocast is not None and autocast_consumed(key):
            return self.autocast
        return self.dtype

    def widened(self, key: str) -> bool:
        """Whether parameter `key` is stored as float32 holding values of the lower run dtype: read
        in float32 on every call, so widened once at load."""
        return self.dtype_of(key) != torch.float32 and FLOAT32_READ.fullmatch(key) is not None

    def autocast_context(self, device: torch.device) -> AbstractContextManager:
        """The autocast region the forward runs in (a no-op without autocast)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def describe(self) -> str:
        """For the sidecar, as the plan says it: 'fp32', 'bf16' or 'fp32 (Linears stored bf16 for autocast)'."""
        name = _name(self.dtype)
        if not self.mixed:
            return name
        return f"{name} (Linears stored {_name(self.autocast)} for autocast)"


SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _name(dtype: torch.dtype | None) -> str:
    return SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))
