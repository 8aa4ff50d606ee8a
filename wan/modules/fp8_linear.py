"""A Linear whose weight stays float8_e4m3fn in memory, with its float32 scale (`wan.fp8`).

State: `weight` (fp8 [out, in]), `scale_weight` (float32, 0-d or [out, 1]; ComfyUI's key name) and
`bias` (the run's precision). All three are parameters (frozen), so the streamed-block flat buffers
carry them like any other parameter: the fp8 bytes travel as fp8.

Compute, per call:
- dequantised (default; every CPU run): `weight.float() * scale` in float32, rounded once to the
  compute dtype, then an ordinary linear. On a float32 run this equals a float32 Linear holding the
  dequantised values bit for bit.
- fp8 matmul (`use_scaled_mm`, set for GPUs with fp8 tensor cores): `torch._scaled_mm` with a dynamic
  activation scale computed on the device; shapes outside _scaled_mm's rules fall back to the
  dequantised form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from wan.weight_storage import WeightStorage

from wan.fp8 import FP8, dequantize, merge_delta, quantize, scaled_mm_linear, scaled_mm_shape_ok


class Fp8Linear(nn.Module):
    """Drop-in for `nn.Linear` in the DiT blocks. `compute_dtype`: what the layer computes in outside
    autocast (the run's parameter dtype: float32 or bf16); `weight.dtype` is fp8 and says nothing
    about it."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        granularity: str = "tensor",
        compute_dtype: torch.dtype = torch.float32,
        bias_dtype: torch.dtype | None = None,
        use_scaled_mm: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.use_scaled_mm = use_scaled_mm
        scale_shape = () if granularity == "tensor" else (out_features, 1)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False
        )
        self.scale_weight = nn.Parameter(
            torch.ones(scale_shape, dtype=torch.float32, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(
                torch.zeros(out_features, dtype=bias_dtype or compute_dtype, device=device),
                requires_grad=False,
            )
            if bias
            else None
        )

    @classmethod
    def from_quantized(
        cls,
        weight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        compute_dtype: torch.dtype = torch.float32,
        use_scaled_mm: bool = False,
    ) -> Fp8Linear:
        """The layer holding an already quantised weight as given (e.g. read from an fp8 file): fp8
        `weight` [out, in] and its float32 `scale` (0-d / one element, or one per row)."""
        if weight.dtype != FP8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D {FP8} tensor, got {weight.dtype} {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        if scale.numel() not in (1, out_features):
            raise ValueError(f"scale has {scale.numel()} values; give 1 or one per row ({out_features})")
        granularity = "tensor" if scale.numel() == 1 else "row"
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            granularity=granularity,
            compute_dtype=compute_dtype,
            bias_dtype=bias.dtype if bias is not None else None,
            use_scaled_mm=use_scaled_mm,
            device="meta",
        )
        layer.weight = nn.Parameter(weight, requires_grad=False)
        shape = () if granularity == "tensor" else (out_features, 1)
        layer.scale_weight = nn.Parameter(scale.float().reshape(shape), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.scale_weight, dtype)

    def merge_(self, delta: torch.Tensor) -> None:
        """Add a float32 update (a LoRA's `scale * up @ down`) to the weight: dequantise, add in
        float32, requantise at the same granularity."""
        weight, scale = merge_delta(self.weight, self.scale_weight, delta.to(self.weight.device))
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale_weight = nn.Parameter(scale.reshape(self.scale_weight.shape), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_mm and scaled_mm_shape_ok(self.in_features, self.out_features):
            out_dtype = (
                x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
            )
            return scaled_mm_linear(x, self.weight, self.scale_weight, self.bias, out_dtype).to(x.dtype)
        weight = self.dequantized_weight(x.dtype)  # float32 product, one rounding to x's dtype
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        granularity = "per-tensor" if self.scale_weight.numel() == 1 else "per-row"
        path = "fp8 matmul" if self.use_scaled_mm else "dequantised"
        return f"in_features={self.in_features}, out_features={self.out_features}, {granularity}, {path}"


# ----------------------------------------------------------------------------------------------------
# Quantising a model's block Linears
# ----------------------------------------------------------------------------------------------------

# The Linears that are quantised: the attention projections and the FFN of every block. Embeddings,
# time MLPs, head, norms, modulation and biases keep the run's precision (small, and the first and
# last layers are the most sensitive).
BLOCK_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)


def quantize_block(
    block: nn.Module,
    *,
    compute_dtype: torch.dtype,
    granularity: str = "tensor",
    use_scaled_mm: bool = False,
) -> None:
    """Replace the block Linears of one block by `Fp8Linear`s, in place. A Linear on the meta device
    (a model about to be loaded) becomes an empty fp8 layer that the loader fills; one holding values
    is quantised (its bias kept as it is)."""
    for name in BLOCK_LINEARS:
        owner_path, _, leaf = name.rpartition(".")
        owner = block.get_submodule(owner_path)
        old = owner.get_submodule(leaf)
        if isinstance(old, Fp8Linear):
            continue
        if not isinstance(old, nn.Linear):
            raise TypeError(f"block.{name} is a {type(old).__name__}, not a Linear")
        if old.weight.is_meta:
            new = Fp8Linear(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                granularity=granularity,
                compute_dtype=compute_dtype,
                bias_dtype=old.bias.dtype if old.bias is not None else None,
                use_scaled_mm=use_scaled_mm,
                device="meta",
            )
        else:
            weight, scale = quantize(old.weight.detach(), granularity)
            bias = old.bias.detach() if old.bias is not None else None
            new = Fp8Linear.from_quantized(
                weight, scale, bias, compute_dtype=compute_dtype, use_scaled_mm=use_scaled_mm
            )
        setattr(owner, leaf, new)


def quantize_model(
    model: nn.Module,
    *,
    compute_dtype: torch.dtype,
    granularity: str = "tensor",
    use_scaled_mm: bool = False,
) -> nn.Module:
    """`quantize_block` over every block of a transformer (`model.blocks`); returns the model."""
    for block in model.blocks:
        quantize_block(
            block, compute_dtype=compute_dtype, granularity=granularity, use_scaled_mm=use_scaled_mm
        )
    return model


def quantize_options(storage: WeightStorage) -> dict:
    """`quantize_block`'s keywords for a run's `wan.weight_storage.WeightStorage`."""
    return {
        "compute_dtype": storage.compute_dtype,
        "granularity": storage.granularity,
        "use_scaled_mm": storage.fp8_matmul,
    }


def fp8_layers(model: nn.Module) -> list[Fp8Linear]:
    return [m for m in model.modules() if isinstance(m, Fp8Linear)]
