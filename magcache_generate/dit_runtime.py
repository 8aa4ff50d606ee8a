"""The DiT's run-time settings for one run: the attention kernel (`--attention`) and `--compile`.

They are applied to every expert model as the sampling loop activates it, and reported in the summary
and the sidecar: the attention backend requested and the kernel that actually ran, and the compile
time (kept out of the denoising time).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from magcache_generate.compile_choice import CACHE_ENV, cache_dir
from magcache_generate.request import Request, UserError
from magcache_generate.validate import check_attention
from wan.modules.attention import AttentionBackendError, AttentionPolicy
from wan.modules.compile import BlockCompiler
from wan.sampling import ModelProvider


def use_compile_cache() -> None:
    """Keep compiled graphs on disk across runs (inductor's FX graph cache, on by default in PyTorch;
    not forced here when the user turned it off with TORCHINDUCTOR_FX_GRAPH_CACHE=0) in a folder that
    survives a reboot (`compile_choice.cache_dir`; TORCHINDUCTOR_CACHE_DIR overrides it)."""
    folder = cache_dir(os.environ)
    os.environ[CACHE_ENV] = str(folder)  # inductor reads it when it first compiles
    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True


class ConfiguredModels:
    """A ModelProvider that applies `configure` to each model it hands out."""

    def __init__(self, provider: ModelProvider, configure: Callable[[nn.Module], None]):
        self.provider, self.configure = provider, configure

    def activate(self, expert: str) -> nn.Module:
        model = self.provider.activate(expert)
        self.configure(model)
        return model


class DitRuntime:
    """One attention policy and (when compiling) one block compiler, shared by every expert and every
    item of a batch: the compiled graph of a video size is compiled once per run."""

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
        if compile:
            use_compile_cache()
        self.compiler = BlockCompiler() if compile else None

    @classmethod
    def for_request(cls, request: Request, device: torch.device, *, compile: bool) -> DitRuntime:
        """`compile`: the run's --compile decision (`compile_choice.decide_compile`)."""
        return cls(request.attention, compile, device, type_checked=request.device != "auto")

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
