"""Lazy, device-aware holder of the DiT experts (upstream `_prepare_model_for_timestep`).

- An expert is loaded on first use, straight to the run device in the run dtype (no float32 detour).
- With `offload`, only the active expert stays on the accelerator: the other one moves to host RAM,
  or is freed when it will not be needed again (`keep_inactive=False`: one video per process, where
  the loop never returns to the high-noise expert), so two A14B experts never sit in host RAM together.
- Without `offload` both stay on the device once loaded (fastest when they fit: 2 x 28.6 GB in bf16).
- There is never more than one copy of a model.
- Each expert's LoRAs (`loras[expert]`) are merged into its weights as they load (`wan.lora`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from wan.loading import load_transformer
from wan.lora import LoraSpec, build_merge, expert_label


class ExpertPool:
    def __init__(
        self,
        paths: dict[str, Path],
        *,
        dtype: torch.dtype,
        device: torch.device,
        offload: bool,
        keep_inactive: bool,
        on_load: Callable[[str, Path], None] | None = None,
        on_shard: Callable[[Path], None] | None = None,
        loras: Mapping[str, Sequence[LoraSpec]] | None = None,
    ):
        self.paths = paths
        self.loras = dict(loras or {})
        self.dtype, self.device = dtype, device
        self.offload, self.keep_inactive = offload, keep_inactive
        self.on_load, self.on_shard = on_load, on_shard
        self.models: dict[str, nn.Module] = {}
        self.active: str | None = None
        self.load_seconds = 0.0

    def activate(self, expert: str) -> nn.Module:
        if expert not in self.paths:
            raise KeyError(f"no model for expert {expert!r}; have {sorted(self.paths)}")
        if self.active is not None and self.active != expert and self.offload:
            self._park(self.active)
        self.active = expert
        model = self.models.get(expert)
        if model is None:
            if self.on_load:
                self.on_load(expert, self.paths[expert])
            import time

            start = time.perf_counter()
            merge = build_merge(
                self.paths[expert], self.loras.get(expert, ()), device=self.device, where=expert_label(expert)
            )
            model = load_transformer(
                self.paths[expert],
                dtype=self.dtype,
                device=self.device,
                on_shard=self.on_shard,
                transform=merge,
            )
            if merge is not None:
                merge.finish()
            self.load_seconds += time.perf_counter() - start
            self.models[expert] = model
        elif _device_of(model) != self.device:
            model.to(self.device)
        return model

    def _park(self, expert: str) -> None:
        model = self.models.get(expert)
        if model is None:
            return
        if self.keep_inactive:
            model.to("cpu")  # a no-op for CPU runs
        else:
            del self.models[expert]
            del model
            gc.collect()
        _empty_cache(self.device)

    def offload_all(self) -> None:
        """Before the VAE decode: experts leave the accelerator (upstream offload_model)."""
        for name in list(self.models):
            self._park(name)
        self.active = None

    def release(self) -> None:
        self.models.clear()
        self.active = None
        gc.collect()
        _empty_cache(self.device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
