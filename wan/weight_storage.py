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

With `quantize="fp8"` the weights of the block Linears are stored float8_e4m3fn with a float32
`scale_weight` each (`wan.fp8`, `wan.modules.fp8_linear`); their biases and everything else keep the
dtypes above. A checkpoint file whose block Linears are already float8 is held the same way
(`from_file`): the file's fp8 bytes and scales are kept as stored, not quantised again.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from wan.weight_formats import BLOCK_LINEAR_WEIGHTS

# Parameters consumed only by autocast-eligible ops (see the module docstring); official key names.
AUTOCAST_CONSUMED = re.compile(
    r"(?:blocks\.\d+\.(?:self_attn|cross_attn)\.[qkvo]|blocks\.\d+\.ffn\.[02]|text_embedding\.[02]"
    r"|patch_embedding)\.(?:weight|bias)"
)


# Linears the forward evaluates in float32 whatever their storage (`wan.modules.block.linear_fp32`).
FLOAT32_READ = re.compile(r"(?:time_embedding\.[02]|time_projection\.1|head\.head)\.(?:weight|bias)")

# The weights that `quantize="fp8"` stores in fp8 (`wan.modules.fp8_linear.BLOCK_LINEARS`).
QUANTIZED_WEIGHTS = BLOCK_LINEAR_WEIGHTS
SCALE_SUFFIX = ".scale_weight"
QUANTIZATIONS = ("fp8",)


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
    quantize: str | None = None  # "fp8": the block Linears' weights in float8_e4m3fn + float32 scales
    granularity: str = "tensor"  # fp8 scales: one per tensor or one per output row ("row")
    fp8_matmul: bool = False  # quantised Linears multiply in fp8 (`torch._scaled_mm`), not dequantised
    from_file: bool = False  # the fp8 weights and scales come as stored in the checkpoint file

    @classmethod
    def for_run(
        cls, dtype: torch.dtype, device: torch.device, quantize: str | None = None, fp8_matmul: bool = False
    ) -> WeightStorage:
        """Upstream's regimes: float32 parameters on CUDA run under bf16 autocast; anything else (bf16
        parameters, or a CPU run) runs in the parameter dtype without autocast."""
        autocast = torch.bfloat16 if device.type == "cuda" and dtype == torch.float32 else None
        return cls(dtype, autocast, quantize, fp8_matmul=fp8_matmul and quantize is not None)

    def keeping_file_fp8(self, granularity: str) -> WeightStorage:
        """This storage for a checkpoint whose block Linears are stored float8 with scales of
        `granularity`: those layers are fp8 Linears holding the file's bytes (as with quantize="fp8",
        without quantising again)."""
        return dataclasses.replace(self, quantize="fp8", granularity=granularity, from_file=True)

    def quantizes(self, key: str) -> bool:
        """Whether parameter `key` (official name) is stored quantised (then with `key`'s scale)."""
        return self.quantize is not None and QUANTIZED_WEIGHTS.fullmatch(key) is not None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the quantised Linears compute in: the autocast dtype, else the run dtype."""
        return self.autocast or self.dtype

    @property
    def mixed(self) -> bool:
        """Whether some parameters are stored in the autocast dtype instead of `dtype`."""
        return self.autocast is not None and self.autocast != self.dtype

    def dtype_of(self, key: str) -> torch.dtype:
        """The storage dtype of parameter `key` (official name, e.g. `blocks.3.ffn.0.weight`)."""
        if self.quantizes(key):
            return torch.float8_e4m3fn
        if key.endswith(SCALE_SUFFIX):
            return torch.float32
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
        if self.mixed:
            name += f" (Linears stored {_name(self.autocast)} for autocast)"
        if self.quantize is not None:
            name += f"; block Linears {self.precision()['dit_block_linears']}"
        return name

    def precision(self) -> dict[str, str]:
        """What precision each part of the DiT ran in (the sidecar's `precision`)."""
        compute = _name(self.compute_dtype)
        if self.quantize is None:
            linears = f"{_name(self.dtype_of('blocks.0.ffn.0.weight'))} weights, {compute} compute"
        else:
            how = "fp8 matmul (_scaled_mm)" if self.fp8_matmul else f"dequantised to {compute}"
            origin = "fp8 (from file): " if self.from_file else ""
            linears = f"{origin}fp8 e4m3 weights, per-{self.granularity} float32 scales, {how}"
        return {
            "dit_block_linears": linears,
            "dit_linear_biases": _name(self.dtype_of("blocks.0.ffn.0.bias")),
            "dit_other": f"{_name(self.dtype)} (embeddings, head, norms, modulation)",
        }


SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _name(dtype: torch.dtype | None) -> str:
    return SHORT_NAMES.get(dtype, str(dtype).removeprefix("torch."))
