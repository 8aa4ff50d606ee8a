"""The DiT's run-time settings for one run: the attention kernel (`--attention`) and `--compile`.

They are applied to every expert model as the sampling loop activates it, and reported in the summary
and the sidecar: the attention backend requested and the kernel that actually ran, and the compile
time (kept out of the denoising time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from magcache_generate.request import Request, UserError
from magcache_generate.validate import check_attention
from wan.modules.attention import AttentionBackendError, AttentionPolicy
from wan.modules.compile import BlockCompiler
from wan.sampling import ModelProvider


class ConfiguredModels:
    """A ModelProvider that applies `configure` to each model it hands out."""

    def __init__(self, provider: ModelProvider, configure: Callable[[nn.Module], None]):
        self.provider, self.configure = provider, configure

    def activate(self, expert: str) -> nn.Module:
        model = self.provider.activate(expert)
        self.configure(model)
        return model


class DitRuntime:
    """One attention policy and (with --compile) one block compiler, shared by every expert and item."""

    def __init__(self, attention: str, compile: bool, device: torch.device, *, type_checked: bool = False):
        """`type_checked`: the request validation already checked `attention` against an explicit
        --device; with --device auto the device type is known only now (still before any weight loads)."""
        if not type_checked:
            check_attention(attention, device.type)
        self.attention = AttentionPolicy(attention)
        try:
            self.attention.check_device(device)
        except AttentionBackendError as err:
            raise UserError(f"--attention {attention}: {err}; use --attention auto") from None
        self.compiler = BlockCompiler() if compile else None

    @classmethod
    def for_request(cls, request: Request, device: torch.device) -> DitRuntime:
        return cls(request.attention, request.compile, device, type_checked=request.device != "auto")

    def configure(self, model: nn.Module) -> None:
        model.attention = self.attention
        model.block_runner = self.compiler

    def models(self, provider: ModelProvider) -> ConfiguredModels:
        return ConfiguredModels(provider, self.configure)

    @property
    def compile_seconds(self) -> float:
        """Host time spent compiling so far (0 without --compile)."""
        return self.compiler.compile_seconds if self.compiler is not None else 0.0

    def report(self) -> dict[str, Any]:
        """The sidecar's `attention` entry: requested backend, the kernel that ran, per call site."""
        return self.attention.report()
