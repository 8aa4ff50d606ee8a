"""Memory placement of a DiT: which blocks stay on the device and which stream from host memory.

`Placement` is the policy (decided by the memory planner before anything loads); the loader and the
expert pool consult it, the sampling loop never sees it. A placed model keeps its first
`resident_blocks` blocks, embeddings and head on the device. Each later ("streamed") block lives in
one flat host buffer per storage dtype (`wan.weight_storage`: bf16 Linears and float32 norms and
modulation in the autocast regime; page-locked at its exact size on CUDA, pageable with one warning
when that fails), and `StreamedBlocks`, the transformer's `block_source`, copies it into one of two
device buffers just ahead of use:

- copies run on a side CUDA stream, overlapped with the compute of the previous block;
- the compute stream waits for the copy of the block it runs (event `copy_done`), and a copy into a
  buffer waits until the compute that read that buffer is done (event `compute_done`);
- the last block of a call prefetches the first streamed block of the NEXT call, so a call that
  MagCache skips (it never iterates the blocks) copies nothing, and the next computed call starts
  with its first streamed block already on the way.

On a CPU run the same logic runs with a fake split ("host" and "device" buffers both in RAM, plain
copies, no streams), so the schedule is testable and the output bit-exact against a resident model.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from wan.fp8 import quantize
from wan.modules.fp8_linear import quantize_block, quantize_options
from wan.weight_storage import SCALE_SUFFIX, WeightStorage

Warn = Callable[[str], None]
ALIGN_BYTES = 256  # every parameter view in a flat buffer starts on this boundary (vectorised kernels)


@dataclass(frozen=True)
class Placement:
    """Where a transformer's weights live while it samples.

    `resident_blocks=None` keeps every block on `device` (today's behaviour). `activation_chunk`
    (tokens per chunk of the blocks' token-local stages, None = unchunked) is handed to the model as
    planned. `log`: told every copy and block run of the streamed blocks (None: nothing is recorded;
    tests pass `wan.testing.stream_log.StreamLog`).
    """

    device: torch.device
    resident_blocks: int | None = None
    pin: bool = True
    activation_chunk: int | None = None
    log: StreamEvents | None = field(default=None, compare=False)

    def is_streamed(self, index: int) -> bool:
        return self.resident_blocks is not None and index >= self.resident_blocks


class StreamEvents(Protocol):
    """What a record of block streaming is told (`wan.testing.stream_log.StreamLog` keeps it)."""

    def copy(self, index: int, slot: int) -> None: ...

    def run(self, index: int, slot: int | None) -> None: ...


# ----------------------------------------------------------------------------------------------------
# Flat parameter buffers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatLayout:
    """Parameter name -> (offset, shape) inside one flat tensor of `dtype` (a block's parameters, or
    those of them stored in `dtype`)."""

    dtype: torch.dtype
    entries: tuple[tuple[str, int, tuple[int, ...]], ...]
    numel: int

    @classmethod
    def of(cls, module: nn.Module, dtype: torch.dtype, names: Collection[str] | None = None) -> FlatLayout:
        """The layout of `module`'s parameters (all, or those in `names`; shapes only, a meta module
        will do), in `dtype`."""
        align = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        entries, offset = [], 0
        for name, param in module.named_parameters():
            if names is not None and name not in names:
                continue
            entries.append((name, offset, tuple(param.shape)))
            offset += math.ceil(param.numel() / align) * align
        if any(True for _ in module.buffers()):
            raise ValueError("streamed blocks must hold parameters only")
        return cls(dtype, tuple(entries), offset)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            name: flat[offset : offset + math.prod(shape)].view(shape) for name, offset, shape in self.entries
        }

    def bind(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Make `module`'s parameters views into `flat` (values are whatever `flat` holds)."""
        for name, view in self.views(flat).items():
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            owner._parameters[leaf] = nn.Parameter(view, requires_grad=False)


@dataclass(frozen=True)
class BlockLayout:
    """A block's parameters in one flat tensor per storage dtype (`wan.weight_storage`): one group when
    every parameter has the run dtype, two (bf16 Linears, float32 norms and modulation) in the autocast
    regime. Each parameter stays a view of a same-dtype tensor; a block copies in one copy per group."""

    groups: tuple[FlatLayout, ...]

    @classmethod
    def of(cls, module: nn.Module, dtype_of: Callable[[str], torch.dtype]) -> BlockLayout:
        """The layout of `module`'s parameters, each in `dtype_of(name)` (name relative to `module`)."""
        by_dtype: dict[torch.dtype, list[str]] = {}
        for name, _ in module.named_parameters():
            by_dtype.setdefault(dtype_of(name), []).append(name)
        return cls(tuple(FlatLayout.of(module, dtype, set(names)) for dtype, names in by_dtype.items()))

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups)

    def allocate(self, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """Uninitialised flat tensors, one per group."""
        return tuple(torch.empty(g.numel, dtype=g.dtype, device=device) for g in self.groups)

    def views(self, flats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: view
            for g, flat in zip(self.groups, flats, strict=True)
            for name, view in g.views(flat).items()
        }

    def bind(self, module: nn.Module, flats: Sequence[torch.Tensor]) -> None:
        for group, flat in zip(self.groups, flats, strict=True):
            group.bind(module, flat)


class HostBlock:
    """One streamed block's weights in flat host tensors (one per storage dtype), page-locked when asked
    and possible.

    `pin_error`: None (not attempted: no CUDA, or not asked), 0 (all page-locked) or the first CUDA
    error (the tensors after it are not tried)."""

    def __init__(self, layout: BlockLayout, pin: bool):
        self.flats = layout.allocate()
        self.pin_error: int | None = None
        for flat in self.flats if pin else ():
            self.pin_error = _page_lock(flat)
            if self.pin_error is None or self.pin_error:
                break
            weakref.finalize(self, _unregister_page_locked, flat)

    @property
    def pinned(self) -> bool:
        return self.pin_error == 0


def _page_lock(flat: torch.Tensor) -> int | None:
    """Page-lock exactly this tensor's memory (cudaHostRegister): torch's pinned allocator rounds
    every request up to a power of two (a 0.7 GB A14B block would take 1 GiB). The CUDA error code,
    0 on success, None without CUDA."""
    if not torch.cuda.is_available():
        return None
    error = int(torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel() * flat.element_size(), 0))
    if error:
        _consume_cuda_error()
    return error


def _consume_cuda_error() -> None:
    """A failed runtime call leaves its error recorded for the thread; the next kernel launch check
    would raise it as if that kernel had failed. Launch one here and swallow that CUDA error (only
    it: anything else, a missing device or a bug, propagates)."""
    try:
        _launch_probe()
    except RuntimeError as err:
        if not is_cuda_error(err):
            raise


def _launch_probe() -> None:
    torch.zeros(1, device="cuda").add_(1)
    torch.cuda.synchronize()


def is_cuda_error(err: BaseException) -> bool:
    """Whether `err` is an error the CUDA runtime reported (torch.AcceleratorError; older torch raises
    a RuntimeError starting "CUDA error")."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    return isinstance(err, RuntimeError) and str(err).startswith("CUDA error")


def _unregister_page_locked(flat: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(flat.data_ptr())


# ----------------------------------------------------------------------------------------------------
# Copy engines: a side CUDA stream with events, or plain copies for the CPU fake split
# ----------------------------------------------------------------------------------------------------


class CudaCopier:
    """Copies on a side stream; events order them against the compute stream both ways."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.copy_done = [torch.cuda.Event(), torch.cuda.Event()]
        self.compute_done = [torch.cuda.Event(), torch.cuda.Event()]

    def copy(self, slot: int, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.compute_done[slot])  # nobody still reads this buffer
            for d, s in zip(dst, src, strict=True):
                d.copy_(s, non_blocking=True)
            self.copy_done[slot].record(self.stream)

    def before_compute(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.copy_done[slot])

    def after_compute(self, slot: int) -> None:
        self.compute_done[slot].record(torch.cuda.current_stream(self.device))


class PlainCopier:
    """The CPU fake split: synchronous copies, nothing to order."""

    def copy(self, slot: int, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)

    def before_compute(self, slot: int) -> None:
        pass

    def after_compute(self, slot: int) -> None:
        pass


# ----------------------------------------------------------------------------------------------------
# The block source
# ----------------------------------------------------------------------------------------------------


class StreamedBlocks:
    """`BlockSource` of a placed model: resident blocks as they are, streamed ones via two buffers.

    `copies` lists the block indices copied host -> device, in order; `events` logs
    ("copy", block, buffer) and ("run", block, buffer or None for a resident block) for tests.
    """

    def __init__(
        self,
        host: dict[int, HostBlock],
        layout: BlockLayout,
        template: nn.Module,
        device: torch.device,
        num_layers: int,
        log: StreamEvents | None = None,
    ):
        self.host, self.layout, self.device = host, layout, device
        self.log = log  # None: nothing recorded (the hot path keeps no history)
        self.first_streamed = min(host) if host else num_layers
        self.num_layers = num_layers
        self._template = template  # a meta Block: the module structure the buffers are bound to
        self.buffers: list[nn.Module] = []
        self._flats: list[tuple[torch.Tensor, ...]] = []
        self._holds: list[int | None] = [None, None]  # block index in each buffer (copy issued)
        self._copier: CudaCopier | PlainCopier | None = None

    # -- device buffers -----------------------------------------------------------------------------

    @property
    def acquired(self) -> bool:
        return bool(self.buffers)

    @property
    def streamed_indices(self) -> range:
        return range(self.first_streamed, self.num_layers)

    def acquire(self) -> None:
        """Allocate the two device buffers and prefetch the first streamed block."""
        if self.acquired or not self.host:
            return
        self._copier = CudaCopier(self.device) if self.device.type == "cuda" else PlainCopier()
        for _ in range(min(2, len(self.host))):
            flats = self.layout.allocate(self.device)
            module = copy.deepcopy(self._template)  # meta parameters: nothing is copied
            self.layout.bind(module, flats)
            self.buffers.append(module.eval())
            self._flats.append(flats)
        self._holds = [None] * len(self.buffers)
        self._prefetch(self.first_streamed, avoid=None)

    def release(self) -> None:
        """Free the device buffers (the host copies stay). Waits for copies in flight, so the host
        buffers may be freed or unpinned right after."""
        if isinstance(self._copier, CudaCopier):
            self._copier.stream.synchronize()
        self.buffers, self._flats, self._holds, self._copier = [], [], [None, None], None

    # -- the schedule ------------------------------------------------------------------------------

    def _slot_of(self, index: int) -> int | None:
        return self._holds.index(index) if index in self._holds else None

    def _prefetch(self, index: int, avoid: int | None) -> int:
        """Issue the copy of block `index` into a buffer other than `avoid` (unless already there)."""
        slot = self._slot_of(index)
        if slot is not None:
            return slot
        slot = next(s for s in range(len(self.buffers)) if s != avoid) if len(self.buffers) > 1 else 0
        assert self._copier is not None
        self._copier.copy(slot, self._flats[slot], self.host[index].flats)
        self._holds[slot] = index
        if self.log is not None:
            self.log.copy(index, slot)
        return slot

    def iter_blocks(self, blocks: nn.ModuleList) -> Iterator[nn.Module]:
        if not self.acquired:
            self.acquire()
        for index in range(self.first_streamed):
            if self.log is not None:
                self.log.run(index, None)
            yield blocks[index]
        copier = self._copier
        for index in self.streamed_indices:
            slot = self._prefetch(index, avoid=None)  # normally already issued by the previous block
            copier.before_compute(slot)
            following = index + 1 if index + 1 < self.num_layers else self.first_streamed
            self._prefetch(following, avoid=slot)  # overlaps with this block's compute
            if self.log is not None:
                self.log.run(index, slot)
            try:
                yield self.buffers[slot]
            finally:
                copier.after_compute(slot)


# ----------------------------------------------------------------------------------------------------
# Placing a model
# ----------------------------------------------------------------------------------------------------


class WeightSink:
    """Receives a transformer's tensors one at a time (read -> transform -> here) and stores each where
    the placement says, in the dtype `storage` gives its key: converted on the device, or into its
    block's flat host buffer.

    Only one full copy of the weights ever exists: the streamed blocks' host buffers are that copy.
    """

    def __init__(
        self,
        model: nn.Module,
        storage: WeightStorage,
        placement: Placement,
        on_warning: Warn | None = None,
        *,
        in_place: bool = False,
    ):
        """`in_place`: the model's parameters are already allocated (sharded by FSDP and materialised):
        each tensor is copied into its parameter (a sharded one receives only this rank's rows)."""
        self.model, self.storage, self.placement, self.in_place = model, storage, placement, in_place
        num_layers = len(model.blocks)
        # every block has the same parameters and storage rule: block 0 stands for all
        self.layout = (
            BlockLayout.of(model.blocks[0], lambda name: storage.dtype_of(f"blocks.0.{name}"))
            if num_layers
            else None
        )
        self.host: dict[int, HostBlock] = {}
        self._host_views: dict[int, dict[str, torch.Tensor]] = {}
        pin = placement.pin
        for index in range(num_layers):
            if placement.is_streamed(index):
                block = HostBlock(self.layout, pin)
                if block.pin_error:  # warn once, stop trying: every later block stays pageable too
                    pin = False
                    _warn(
                        f"could not page-lock host memory for streamed DiT blocks (CUDA error {block.pin_error}); "
                        "using pageable memory: correct but slower copies",
                        on_warning,
                    )
                self.host[index] = block
                self._host_views[index] = self.layout.views(block.flats)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if self.storage.quantizes(key):  # --quantize fp8: the fp8 weight and its float32 scale
            weight, scale = quantize(tensor, self.storage.granularity)
            self._put(key, weight)
            self._put(key.removesuffix(".weight") + SCALE_SUFFIX, scale)
        else:
            self._put(key, tensor)

    def put_quantized(self, key: str, weight: torch.Tensor, scale: torch.Tensor) -> None:
        """A weight already in fp8 (an fp8 file's bytes) and its float32 scale, stored as given (copied,
        never aliasing the caller's tensors); a per-tensor scale in a per-row layer fills every row."""
        rows = weight.shape[0]
        shape = () if self.storage.granularity == "tensor" else (rows, 1)
        scale = scale.float().reshape(-1, 1).expand(rows, 1) if shape else scale.float().reshape(())
        self._put(key, weight, copy=True)
        self._put(key.removesuffix(".weight") + SCALE_SUFFIX, scale.reshape(shape), copy=True)

    def _put(self, key: str, tensor: torch.Tensor, copy: bool = False) -> None:
        index, name = _block_key(key)
        if index is not None and index in self.host:
            view = self._host_views[index][name]
            view.copy_(tensor)  # converts to the buffer dtype on the way in
            set_tensor(self.model, key, view)
        elif self.in_place:
            self._copy_into(key, tensor)
        else:
            device, dtype = self.placement.device, self.storage.dtype_of(key)
            stored = tensor.to(device=device, dtype=dtype, copy=copy).contiguous()
            if self.storage.widened(key):  # rounded to the run dtype, then widened once (exact)
                stored = stored.float()
            set_tensor(self.model, key, stored)

    def _copy_into(self, key: str, tensor: torch.Tensor) -> None:
        """`tensor` (the whole value) into the allocated parameter `key`: its dtype rounded as stored
        (then widened where the storage says so), only this rank's rows of a sharded one."""
        from wan.distributed.fsdp import is_sharded, local_rows

        module_path, _, name = key.rpartition(".")
        target = getattr(self.model.get_submodule(module_path) if module_path else self.model, name)
        if is_sharded(target):
            tensor, target = local_rows(tensor, target), target.to_local()
        with torch.no_grad():
            target.copy_(tensor.to(self.storage.dtype_of(key)))

    def finish(self) -> nn.Module:
        """The loaded model, its streamed blocks attached as its block source (buffers acquired)."""
        model = self.model
        model.activation_chunk = self.placement.activation_chunk
        if self.host:
            with torch.device("meta"):  # the structure the device buffers are bound to
                template = type(model.blocks[0])(model.config)
            if self.storage.quantize is not None:
                quantize_block(template, **quantize_options(self.storage))
            source = StreamedBlocks(
                self.host, self.layout, template, self.placement.device, len(model.blocks), self.placement.log
            )
            model.block_source = source
            source.acquire()
        return model


def _warn(message: str, on_warning: Warn | None) -> None:
    if on_warning is not None:
        on_warning(message)
    else:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _block_key(key: str) -> tuple[int | None, str]:
    if key.startswith("blocks."):
        _, index, name = key.split(".", 2)
        return int(index), name
    return None, key


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def streamed_source(model: nn.Module) -> StreamedBlocks | None:
    source = getattr(model, "block_source", None)
    return source if isinstance(source, StreamedBlocks) else None


def resident_modules(model: nn.Module) -> Iterator[nn.Module]:
    """The submodules that live on the device: everything but the streamed blocks."""
    source = streamed_source(model)
    skip = set(source.streamed_indices) if source is not None else set()
    for name, child in model.named_children():
        if name == "blocks":
            yield from (block for i, block in enumerate(child) if i not in skip)
        else:
            yield child


def move_resident(model: nn.Module, device: torch.device) -> None:
    """Move the resident part to `device`; streamed blocks stay in host memory. Buffers are acquired
    on a device and released off it."""
    for module in resident_modules(model):
        module.to(device)
    source = streamed_source(model)
    if source is None:
        return
    if device == source.device:
        source.acquire()
    else:
        source.release()


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the parameters that `move_resident` moves (device buffers not included)."""
    return sum(p.numel() * p.element_size() for m in resident_modules(model) for p in m.parameters())


def device_of(model: nn.Module) -> torch.device:
    """The device of the resident part (the patch embedding lives there)."""
    return model.patch_embedding.weight.device
