"""`--quantize fp8` and `--fp8-matmul auto|on|off`: checked before anything loads.

`--quantize fp8` stores the DiT blocks' Linear weights in float8_e4m3fn with float32 scales
(`wan.fp8`, `wan.modules.fp8_linear`); `--fp8-matmul` says whether those Linears multiply in fp8 on
the tensor cores (`torch._scaled_mm`, CUDA compute capability >= 8.9) or dequantise each weight
first: auto = fp8 matmul where the GPU has it, on = insist (an error elsewhere), off = dequantise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from magcache_generate.request import UserError

if TYPE_CHECKING:
    import torch

QUANTIZATIONS = ("fp8",)
FP8_MATMUL_MODES = ("auto", "on", "off")


def check_quantize(value: str | None) -> str | None:
    if value is not None and value not in QUANTIZATIONS:
        raise UserError(f"--quantize {value!r} is not supported; use --quantize fp8, or leave it out")
    return value


def check_fp8_matmul(value: str, quantize: str | None, *, fp8_files: bool = False) -> str:
    """``--fp8-matmul`` as given; ``on`` needs fp8 weights: ``--quantize fp8`` or fp8 DiT files
    (``fp8_files``: every DiT file holds fp8 block Linears, or the files are not resolved yet)."""
    if value not in FP8_MATMUL_MODES:
        raise UserError(f"--fp8-matmul {value!r} is not one of auto, on, off; use auto (default), on or off")
    if value == "on" and quantize is None and not fp8_files:
        raise UserError(
            "--fp8-matmul on multiplies fp8 weights; add --quantize fp8 or load fp8 DiT files "
            "(or drop --fp8-matmul)"
        )
    return value


def resolve_fp8_matmul(mode: str, quantize: str | None, device: torch.device) -> bool:
    """Whether the run's fp8 Linears use `torch._scaled_mm` (decided once the device is known)."""
    from wan.fp8 import scaled_mm_capable

    if quantize is None or mode == "off":
        return False
    capable = scaled_mm_capable(device)
    if mode == "on" and not capable:
        raise UserError(
            f"--fp8-matmul on needs a CUDA GPU with fp8 tensor cores (compute capability 8.9 or newer); "
            f"this run is on {device}: use --fp8-matmul auto or off"
        )
    return capable
