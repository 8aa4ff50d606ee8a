"""Honest memory and time figures of one generated item, stage by stage.

- Wall time of a stage is read after synchronising the device at both ends, so queued GPU work is
  charged to the stage that queued it (without it, a CUDA decode looked almost free).
- GPU: peak allocated AND peak reserved (what the caching allocator holds, what `nvidia-smi` sees
  minus the CUDA context) per stage; each stage starts with the allocator's cache emptied and the
  peak counters reset.
- Host pressure: what this process takes from the machine that the kernel cannot take back, i.e.
  anonymous resident memory (RssAnon) plus page-locked buffers from torch's pinned allocator, the
  peak sampled every 20 ms during the stages. The file-backed part (RssFile: memory-mapped checkpoint
  pages, which are page cache the kernel reclaims under pressure) is stated apart.
- Host RSS: the peak resident set of THIS item, not of the process: on Linux the kernel's high-water
  mark is reset at the item's start (writing "5" to /proc/self/clear_refs) and read from VmHWM at its
  end. Where that is impossible it falls back to `ru_maxrss` (the process lifetime) and says so. It
  counts mapped file pages too, so it overstates the pressure of a memory-mapped load.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from magcache_generate.allocator import allocator_setting

GIB = 2**30
HOST_SCOPE_ITEM = "item (VmHWM reset at its start)"
HOST_SCOPE_PROCESS = "process lifetime (ru_maxrss)"


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def host_memory() -> dict[str, int] | None:
    """Bytes now: ``anon`` (RssAnon), ``file`` (RssFile), ``pinned`` (torch's pinned host allocator;
    memory page-locked in place is already in RssAnon). None where /proc/self/status is missing."""
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                fields[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(fields) < 2:
        return None
    return {"anon": fields["RssAnon"], "file": fields["RssFile"], "pinned": pinned_host_bytes()}


def pinned_host_bytes() -> int:
    """Bytes held by torch's pinned (page-locked) host allocator; 0 before CUDA is initialised."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return 0
    try:
        return int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    except (RuntimeError, AttributeError):
        return 0


class HostPressure:
    """Peak of anonymous + pinned host bytes (and the file-backed bytes at most), sampled on a thread
    while a stage runs: the kernel keeps no high-water mark of RssAnon."""

    INTERVAL_S = 0.02

    def __init__(self) -> None:
        self.peak_pressure = 0
        self.peak_file = 0
        self.supported = host_memory() is not None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        now = host_memory()
        if now is not None:
            self.peak_pressure = max(self.peak_pressure, now["anon"] + now["pinned"])
            self.peak_file = max(self.peak_file, now["file"])

    def start(self) -> None:
        if not self.supported or self._thread is not None:
            return
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="host-pressure", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.supported:
            self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self.sample()


def reset_host_peak() -> bool:
    """Reset the kernel's resident-set high-water mark of this process; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def host_peak_bytes(item_scope: bool) -> tuple[int, str]:
    """(peak resident bytes, what it covers)."""
    if item_scope:
        hwm = _status_kib("VmHWM")
        if hwm is not None:
            return hwm * 1024, HOST_SCOPE_ITEM
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), HOST_SCOPE_PROCESS


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageMeter:
    """Times and memory peaks of the stages of one item: `with meter.stage("decode"): ...`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.gpu: dict[str, dict[str, float]] = {}
        self._item_scope = reset_host_peak()
        self.host = HostPressure()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        cuda = self.device.type == "cuda"
        synchronize(self.device)
        if cuda:
            # Blocks cached by the previous stage (e.g. the decode's) would count against this one and
            # fragment it: a stage starts from what is really in use.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.host.start()
        try:
            yield
        finally:
            synchronize(self.device)
            self.host.stop()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if cuda:
                peaks = {
                    "gpu_allocated_gib": torch.cuda.max_memory_allocated(self.device) / GIB,
                    "gpu_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GIB,
                }
                seen = self.gpu.get(name, {})
                self.gpu[name] = {k: round(max(v, seen.get(k, 0.0)), 3) for k, v in peaks.items()}

    def peak_memory(self) -> dict[str, Any]:
        """The sidecar's `peak_memory`: host pressure (anonymous + pinned) and file-backed peaks, host
        RSS of this item, GPU peaks overall and per stage."""
        host, scope = host_peak_bytes(self._item_scope)
        record: dict[str, Any] = {}
        if self.host.supported:
            record["host_pressure_gib"] = round(self.host.peak_pressure / GIB, 3)
            record["host_file_backed_gib"] = round(self.host.peak_file / GIB, 3)
        record |= {"host_rss_gib": round(host / GIB, 3), "host_rss_scope": scope}
        if self.device.type != "cuda":
            record["gpu_allocated_gib"] = None
            return record
        record["cuda_allocator"] = allocator_setting()
        for key in ("gpu_allocated_gib", "gpu_reserved_gib"):
            record[key] = max((stage[key] for stage in self.gpu.values()), default=0.0)
        record["stages"] = dict(self.gpu)
        return record
