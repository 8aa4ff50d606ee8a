"""float8_e4m3fn weights with float32 scales: the quantise / dequantise arithmetic and its rules.

A quantised weight is a pair (`weight` float8_e4m3fn [out, in], `scale` float32) whose value is
`weight.float() * scale` (ComfyUI's `scale_weight` convention, so files from either side mean the same
numbers). The scale is per tensor (0-d, ComfyUI's `scale_weight`) or per output row ([out, 1], the
per-channel form some converters write); both read the same way, by broadcasting.

Quantisation picks the scale so the largest magnitude maps to the format's largest finite value
(448), then rounds to nearest even; no value saturates. Per-tensor is the default: on block-Linear
weights it costs little over per-row (see docs/fp8.md for the measured figures), keeps the ComfyUI
layout, and the fp8 matmul then needs only 0-d scales, which every fp8-capable GPU supports.

The fp8 matmul (`torch._scaled_mm`) multiplies an fp8 activation by the fp8 weight on the tensor cores
of GPUs with compute capability >= 8.9. Its CUDA rules: both operands float8, the first row-major, the
second column-major (the [out, in] weight transposed is exactly that), the reduction dimension and the
output width multiples of 16, scales float32 and either both 0-d (per tensor) or [M, 1] and [1, N]
(per row, bf16 output). Shapes that break the rules compute through the dequantised weight instead.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
GRANULARITIES = ("tensor", "row")
MATMUL_MULTIPLE = 16  # _scaled_mm on CUDA: reduction dim and output width are multiples of this
MIN_SCALE = 1e-12  # a zero tensor (or row) quantises with this scale: zeros, no division by zero
SCALED_MM_CAPABILITY = (8, 9)  # Ada / Hopper and later: fp8 tensor cores


def quantize(weight: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale) with `weight ~= fp8.float() * scale`; computed in float32.

    `granularity` "tensor": one 0-d scale; "row": one scale per output row, shaped [out, 1]."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    w = weight.float()
    if granularity == "tensor":
        amax = w.abs().amax()
    else:
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).reshape(w.shape[0], 1)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    scaled = w / (scale if granularity == "tensor" else scale.reshape(-1, *[1] * (w.dim() - 1)))
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`weight.float() * scale` (per-tensor or per-row scale), in `dtype`, rounded once from float32.

    Computed without a float32 copy of the weight: the fp8 values convert exactly to any wider float
    (bf16 included), and the in-place multiply by a float32 scale with dimensions (never 0-d, which
    would be rounded to `dtype` first) runs in float32 and rounds once on writing, so the result
    equals `(weight.float() * scale).to(dtype)` bit for bit."""
    out = weight.to(dtype, copy=True)
    return out.mul_(_broadcastable(scale, weight))


def granularity_of(scale: torch.Tensor) -> str:
    """ "tensor" for a single scale (0-d or one element), "row" for one per output row."""
    return "tensor" if scale.numel() == 1 else "row"


def merge_delta(
    weight: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 update (a LoRA) merged into a quantised weight: dequantise, add in float32, requantise
    at the same granularity (the scale grows with the merged weight's range)."""
    merged = dequantize(weight, scale) + delta.float()
    return quantize(merged, granularity_of(scale))


def _broadcastable(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The float32 scale shaped to broadcast over `weight` with every dimension kept (see `dequantize`)."""
    rows = 1 if scale.numel() == 1 else weight.shape[0]
    return scale.float().reshape(rows, *[1] * (weight.dim() - 1))


# ----------------------------------------------------------------------------------------------------
# The fp8 matmul
# ----------------------------------------------------------------------------------------------------


def scaled_mm_capable(device: torch.device) -> bool:
    """Whether `device` multiplies fp8 on tensor cores (CUDA, compute capability >= 8.9)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= SCALED_MM_CAPABILITY


def scaled_mm_shape_ok(in_features: int, out_features: int) -> bool:
    """Whether a Linear of this shape meets _scaled_mm's CUDA dimension rules (multiples of 16)."""
    return in_features % MATMUL_MULTIPLE == 0 and out_features % MATMUL_MULTIPLE == 0


def activation_scale(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """The dynamic scale of a 2-D activation [M, K]: 0-d ("tensor") or [M, 1] ("row"), float32, computed
    on the device (nothing read on the host)."""
    if granularity == "tensor":
        amax = x.abs().amax().float()
    else:
        amax = x.abs().amax(dim=1, keepdim=True).float()
    return (amax / FP8_MAX).clamp(min=MIN_SCALE)


def quantize_activation(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row-major contiguous fp8 [M, K], float32 scale) of a 2-D activation."""
    scale = activation_scale(x, granularity)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scale


def scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y = x @ (weight * scale).T + bias through `torch._scaled_mm`: x [..., K] quantised with a dynamic
    scale of the weight's granularity, weight [N, K] fp8 (its transpose is the column-major operand)."""
    rows = x.reshape(-1, x.shape[-1])
    granularity = granularity_of(scale)
    xq, x_scale = quantize_activation(rows, granularity)
    if granularity == "tensor":
        w_scale = scale.reshape(()).float()
    else:  # per-row scales exist only with a bf16 output on CUDA
        w_scale, out_dtype = scale.reshape(1, -1).float(), torch.bfloat16
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])
