"""Which exact attention kernel the transformer runs: a small policy object the model consults.

Backends (all exact softmax attention, scale 1/sqrt(head_dim), no mask, as upstream):

- `auto`: FlashAttention-3 when `flash_attn_interface` is installed and the inputs are half precision
  on a Hopper GPU (upstream's kernel there), otherwise PyTorch SDPA's own choice (cuDNN on Hopper with
  torch 2.11+; its flash kernel on the CPU).
- `cudnn`, `flash`, `efficient`, `math`: force that PyTorch SDPA backend (`flash` and `math` also run
  on the CPU).
- `fa3` / `fa2`: FlashAttention-3 (`flash_attn_interface`) / flash-attn 2 (`flash_attn`): CUDA only,
  imported lazily, never required.

The policy records the kernel that actually ran per call site ("self", "cross"), for the summary and
the sidecar. It decides from tensor metadata only: no host-device synchronisation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan.attention_backends import BACKENDS, PACKAGES, backend_installed, backend_problem

__all__ = ["BACKENDS", "AttentionBackendError", "AttentionPolicy"]

SDPA_BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
SDPA_LABELS = {backend: name for name, backend in SDPA_BACKENDS.items()}


class AttentionBackendError(ValueError):
    """The requested attention backend cannot run here (unknown, not installed, or CUDA-only on a CPU)."""


class AttentionPolicy:
    """Runs attention with the requested backend and remembers which kernel ran.

    `policy(q, k, v, site)` takes and returns [B, L, heads, head_dim], the layout the projections
    produce. SDPA gets transposed views of it: [B, heads, L, head_dim] with strides
    (L*dim, head_dim, dim, 1). That is the unpacked layout cuDNN's layout check accepts (torch
    versions that apply it; a `.contiguous()` [B, heads, L, head_dim] copy would fail it), it has unit
    stride in head_dim (flash, efficient) and offset 0 (efficient's alignment check), and the fused
    kernels return their output in the query's layout, so transposing back gives a contiguous
    [B, L, heads, head_dim] and the caller's reshape to [B, L, dim] is a view. No mask is passed
    (upstream attends to every row), q, k and v share one half-precision dtype on CUDA, head_dim is
    128: nothing pushes SDPA off its fused kernels. FlashAttention-3/2 take [B, L, heads, head_dim].
    """

    def __init__(self, backend: str = "auto"):
        problem = backend_problem(backend, None)
        if problem is not None:
            raise AttentionBackendError(f"attention backend {backend!r} {problem}")
        self.requested = backend
        self.used: dict[str, str] = {}  # call site -> kernel label, e.g. {"self": "sdpa-cudnn/cuda"}
        self._kernels: dict[str, Callable[..., object]] = {}
        self._auto: dict[torch.device, str] = {}  # what `auto` resolves to on a device (decided once)

    def check_device(self, device: torch.device) -> None:
        """Raise AttentionBackendError if the requested backend cannot run on `device` (a package
        backend is imported here, so a broken install fails before any weight loads)."""
        problem = backend_problem(self.requested, device.type)
        if problem is not None:
            raise AttentionBackendError(f"attention backend {self.requested!r} {problem}")
        if self.requested in PACKAGES:
            try:
                self._package_kernel(self.requested)
            except (ImportError, OSError, AttributeError) as err:
                raise AttentionBackendError(
                    f"attention backend {self.requested!r}: {PACKAGES[self.requested]} does not import ({err})"
                ) from None

    @torch.compiler.disable  # a compiled block calls attention eagerly: external kernels and the record
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: str = "self") -> torch.Tensor:
        kind = self._resolve(q)
        if kind in PACKAGES:
            out = self._package_kernel(kind)(q, k, v)
            out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the LSE
            self.used[site] = f"{kind}/{q.device.type}"
            return out
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kind == "auto":
            choice = _sdpa_choice(qt, kt, vt)
            out = F.scaled_dot_product_attention(qt, kt, vt)
        else:
            choice = SDPA_BACKENDS[kind]
            with sdpa_kernel([choice]):
                out = F.scaled_dot_product_attention(qt, kt, vt)
        label = "auto" if choice is None else SDPA_LABELS.get(choice, choice.name.lower())
        self.used[site] = f"sdpa-{label}/{q.device.type}"
        return out.transpose(1, 2)

    def _resolve(self, q: torch.Tensor) -> str:
        if self.requested != "auto":
            return self.requested
        if q.dtype not in (torch.float16, torch.bfloat16):
            return "auto"
        if q.device not in self._auto:
            self._auto[q.device] = "fa3" if _fa3_runs_on(q.device) and self._imports("fa3") else "auto"
        return self._auto[q.device]

    def _imports(self, name: str) -> bool:
        try:
            self._package_kernel(name)
        except (ImportError, OSError, AttributeError):
            return False  # installed but broken: `auto` uses SDPA instead
        return True

    def _package_kernel(self, name: str) -> Callable[..., object]:
        if name not in self._kernels:
            self._kernels[name] = importlib.import_module(PACKAGES[name]).flash_attn_func
        return self._kernels[name]

    def describe(self) -> str:
        """The kernel that ran: one label when every call site used the same, else one per site."""
        labels = sorted(set(self.used.values()))
        if len(labels) <= 1:
            return labels[0] if labels else "none"
        return ", ".join(f"{site}: {label}" for site, label in sorted(self.used.items()))

    def report(self) -> dict[str, object]:
        """For the sidecar: the requested backend and the kernel that actually ran."""
        return {"requested": self.requested, "actual": self.describe(), "by_site": dict(self.used)}


def _fa3_runs_on(device: torch.device) -> bool:
    """FlashAttention-3 is installed and the device is a Hopper GPU, the architecture it targets."""
    if device.type != "cuda" or not backend_installed("fa3"):
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


def _sdpa_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> SDPBackend | None:
    """The backend SDPA's dispatcher picks for these inputs: the very function SDPA calls, i.e. its
    host-side checks of dtypes, shapes, strides and enabled backends. None if torch does not expose it."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    return None if choose is None else SDPBackend(choose(q, k, v))
