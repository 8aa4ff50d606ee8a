"""Lazy, device-aware holder of the DiT experts (upstream `_prepare_model_for_timestep`).

- An expert is loaded on first use, straight to its places in its storage dtypes (no float32 detour;
  `WeightStorage`: bf16 Linears for float32 runs under autocast): the `Placement` (from the memory
  plan) says which blocks stay on the device and which stream from host memory; those land directly
  in their host buffers, the only host copy.
- With `offload`, only the active expert stays on the accelerator: the other one moves to host RAM
  (batch runs, which come back to it) only if the host has room for it, else it is freed and
  reloaded when needed; for one video per process (`keep_inactive=False`) it is always freed, since
  the loop never returns to the high-noise expert. So two A14B experts never fill host RAM.
- Without `offload` both stay on the device once loaded (fastest when they fit: 2 x 28.6 GB in bf16;
  the default float32 regime stores its Linears in bf16 too, so about 2 x 29 GB).
- There is never more than one copy of a model.
- Each expert's LoRAs (`loras[expert]`) are merged into its weights as they load (`wan.lora`).
- `prefetch(expert)` starts an expert's load on a background thread (the caller encodes text
  meanwhile); with `background_next` activating an expert starts the next one's load while it
  denoises. `activate` takes a started load's model, or its error, as if it had loaded there.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from wan.background_load import BackgroundLoad
from wan.loading import load_transformer
from wan.lora import LoraSpec, build_merge, expert_label
from wan.placement import Placement, device_of, move_resident, resident_bytes, streamed_source
from wan.weight_storage import WeightStorage

HOST_HEADROOM = 4 * 2**30  # host RAM left free after parking an expert (the OS, the VAE, frames)


def available_host_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in open("/proc/meminfo").read().splitlines():  # noqa: SIM115 - a tiny procfs read
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
        placement: Placement | None = None,
        host_available: Callable[[], int | None] = available_host_memory,
        on_warning: Callable[[str], None] | None = None,
        storage: WeightStorage | None = None,
        background_next: bool = False,
        shard: Callable[[nn.Module], None] | None = None,
    ):
        """`shard`: splits each expert's weights over ranks as it loads (`load_transformer`'s `shard`)."""
        self.paths = paths
        self.shard = shard
        self.loras = dict(loras or {})
        self.dtype, self.device = dtype, device
        self.storage = storage or WeightStorage(dtype)  # per-parameter dtypes (bf16 Linears under autocast)
        self.offload, self.keep_inactive = offload, keep_inactive
        self.on_load, self.on_shard, self.on_warning = on_load, on_shard, on_warning
        self.placement = placement or Placement(device)
        self.host_available = host_available
        self.models: dict[str, nn.Module] = {}
        self.active: str | None = None
        self.load_seconds = 0.0
        self._expert_bytes = 0  # host + device bytes of one loaded expert (the largest seen)
        self.background_next = background_next
        self._pending: dict[str, BackgroundLoad[nn.Module]] = {}
        self.loads: list[tuple[str, float, float]] = []  # (expert, start, end) of each load, perf_counter

    def prefetch(self, expert: str) -> None:
        """Start loading `expert` on a background thread (nothing if it is loaded or loading)."""
        if expert in self.paths and expert not in self.models and expert not in self._pending:
            self._pending[expert] = BackgroundLoad(expert, lambda: self._load(expert))

    def activate(self, expert: str) -> nn.Module:
        if expert not in self.paths:
            raise KeyError(f"no model for expert {expert!r}; have {sorted(self.paths)}")
        if self.active is not None and self.active != expert and self.offload:
            self._park(self.active)
        self.active = expert
        model = self.models.get(expert)
        if model is None:
            pending = self._pending.pop(expert, None)
            model = pending.result() if pending is not None else self._load(expert)  # its error, once
            self.models[expert] = model
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            self._expert_bytes = max(self._expert_bytes, size)
        elif device_of(model) != self.device:
            move_resident(model, self.device)
        if self.background_next:  # the next expert, once: a freed one is reloaded only when needed
            for other in self.paths:
                if other not in self.models and all(other != name for name, _, _ in self.loads):
                    self.prefetch(other)
        return model

    def _load(self, expert: str) -> nn.Module:
        """Read, place (and LoRA-merge) one expert; safe on a background thread (touches no pool state
        but the load records)."""
        if self.on_load:
            self.on_load(expert, self.paths[expert])
        # the current CUDA device is per thread: a background load must see this pool's (cuda:LOCAL_RANK
        # under torchrun), not device 0
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            return self._load_here(expert)

    def _load_here(self, expert: str) -> nn.Module:
        start = time.perf_counter()
        merge = build_merge(
            self.paths[expert], self.loras.get(expert, ()), device=self.device, where=expert_label(expert)
        )
        model = load_transformer(
            self.paths[expert],
            storage=self.storage,
            on_shard=self.on_shard,
            placement=self.placement,
            on_warning=self.on_warning,
            transform=merge,
            shard=self.shard,
        )
        if merge is not None:
            merge.finish()
        end = time.perf_counter()
        self.load_seconds += end - start
        self.loads.append((expert, start, end))
        return model

    def _park(self, expert: str) -> None:
        model = self.models.get(expert)
        if model is None:
            return
        if self.keep_inactive and self._host_has_room(model):
            move_resident(model, torch.device("cpu"))  # a no-op for CPU runs
        else:
            _drop_streaming(model)
            del self.models[expert]
            del model
            gc.collect()
        _empty_cache(self.device)

    def _host_has_room(self, model: nn.Module) -> bool:
        """Whether parking `model`'s device part in host RAM leaves room for loading the other expert."""
        if self.device.type == "cpu":
            return True  # nothing moves
        free = self.host_available()
        if free is None:
            return True
        loaded = len(self.models) + len(self._pending)
        pending = 0 if loaded >= len(self.paths) else self._expert_bytes  # a load still to come
        need = resident_bytes(model) + pending + HOST_HEADROOM
        if free >= need:
            return True
        if self.on_warning:
            self.on_warning(
                f"not keeping the idle DiT expert in host RAM ({need / 2**30:.1f} GiB needed, "
                f"{free / 2**30:.1f} GiB free): it will be reloaded when needed"
            )
        return False

    def offload_all(self) -> None:
        """Before the VAE decode: experts leave the accelerator (upstream offload_model)."""
        for name in list(self.models):
            self._park(name)
        self.active = None

    def release(self) -> None:
        self._pending.clear()  # a load still running finishes on its daemon thread, unused
        for model in self.models.values():
            _drop_streaming(model)
        self.models.clear()
        self.active = None
        gc.collect()
        _empty_cache(self.device)


def _drop_streaming(model: nn.Module) -> None:
    """Before a streamed model is freed: no copy may still read its host buffers."""
    source = streamed_source(model)
    if source is not None:
        source.release()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
