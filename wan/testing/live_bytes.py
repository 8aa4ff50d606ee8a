"""Peak live tensor bytes of a piece of code, counted exactly at the dispatcher (no allocator, no RSS).

`LiveBytes` is a TorchDispatchMode: every tensor an op returns whose storage is new (not one of the
op's inputs' storages) is counted until the last tensor sharing that storage is garbage; views add
no bytes. It works on real tensors and on the meta device, so the peak of a real-size VAE decode or
DiT block can be measured in seconds on a CPU. It counts what a CUDA run would report as allocated,
minus the allocator's rounding and library workspaces (cuBLAS, cuDNN).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [live tensors, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._hold(tensor, inputs)
        return out

    def _hold(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        key = _key(tensor)
        entry = self._storages.get(key)
        if entry is None:
            if key in inputs:  # a view of something allocated outside: not ours to count
                return
            nbytes = tensor.untyped_storage().nbytes()
            entry = self._storages[key] = [0, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
