"""Running the command over a torchrun world: the parallel options and their checks, the rank's part of
the run, who prints and who writes, and what happens when a rank fails.

Torch-free at import (the checks run before anything loads); `RankRuntime.start` imports torch.

- Checks: `check_parallel` refuses a layout that cannot run (one line, exit 2, before loading). Every
  rank runs the same checks on the same command line, so every rank stops; only rank 0 prints.
- Printing: rank 0 prints the run's log; the other ranks print only their own failure (`quiet_console`,
  `silent_error`).
- Writing: the first rank of each replica decodes and writes its videos, sidecars and frames
  (`RankRuntime.is_writer`); the sidecar records the world size, the layout and every rank's peak memory.
- Failure: an error on one rank ends that process with a line naming the rank; torchrun then ends the
  others. A rank blocked in a collective that a dead rank never joins raises when the process group's
  timeout expires, so no rank waits forever even without torchrun. A rank that only lost its peers says
  so in a line that points to the cause. Outputs are written atomically, so a run that ends early leaves
  no half-written video.
- Ctrl-C: the terminal interrupts torchrun, which interrupts every rank; each ends with exit 130, rank 0
  alone prints "error: interrupted".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from magcache_generate.request import UserError
from wan.distributed.layout import ParallelLayout, launched_rank, launched_world, layout_problem

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from wan.distributed.cfg import CfgParallel
    from wan.distributed.context import ParallelContext
    from wan.distributed.sequence import SequenceParallel


@dataclass(frozen=True)
class ParallelOptions:
    """The multi-process options (upstream's --ulysses_size, --dit_fsdp, --t5_fsdp, plus --cfg-parallel)."""

    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    def layout(self, environ: dict[str, str] | None = None) -> ParallelLayout:
        return ParallelLayout(launched_world(environ), self.ulysses_size, self.cfg_parallel)


def check_parallel(
    options: ParallelOptions,
    *,
    uses_cfg: bool,
    prompt_file: bool,
    calibrate: bool = False,
    offload: bool = False,
    num_heads: int | None = None,
    environ: dict[str, str] | None = None,
) -> ParallelLayout:
    """The run's layout, or UserError naming the option and the fix. `offload`: --offload-model is on
    (off by default under torchrun)."""
    layout = options.layout(environ)
    problem = layout_problem(layout, num_heads=num_heads, uses_cfg=uses_cfg, prompt_file=prompt_file)
    if problem is None and not layout.distributed:
        flags = [f for f, on in (("--dit-fsdp", options.dit_fsdp), ("--t5-fsdp", options.t5_fsdp)) if on]
        if flags:
            problem = (
                f"{' and '.join(flags)} {'need' if len(flags) > 1 else 'needs'} several processes; launch "
                "with torchrun --nproc-per-node N -m magcache_generate ..., or drop it on one GPU"
            )
    if problem is None and options.dit_fsdp and layout.distributed and layout.ulysses < 2:
        problem = (
            "--dit-fsdp shards the DiT over a Ulysses group, and this one has 1 rank; add "
            f"--ulysses-size N (a divisor of the world size {layout.world}), or drop --dit-fsdp"
        )
    if problem is None and options.dit_fsdp and offload and layout.distributed:
        problem = (
            "--dit-fsdp keeps every expert sharded on the GPUs, and --offload-model True would move the "
            "shards to host memory between steps; drop --offload-model True (off by default with --dit-fsdp)"
        )
    if problem is None and calibrate and layout.cfg_parallel:
        problem = (
            "--magcache-calibrate records both branches on one rank; drop --cfg-parallel for the "
            "calibration run (--ulysses-size works)"
        )
    if problem is not None:
        raise UserError(problem)
    return layout


def is_main_rank(environ: dict[str, str] | None = None) -> bool:
    """Rank 0 of a torchrun world, or a single process: the one that prints."""
    return launched_rank(environ) == 0


def quiet_console(console: Console) -> Console:
    """The console of this rank: `console` on rank 0, a silent one on the others."""
    if is_main_rank():
        return console
    from rich.console import Console

    return Console(quiet=True)


def silent_error(err: BaseException, user_errors: tuple[type[BaseException], ...]) -> bool:
    """Whether this rank keeps `err` to itself: a bad input (the same on every rank, so rank 0 says it)."""
    return launched_world() > 1 and not is_main_rank() and isinstance(err, user_errors)


def silent_interrupt() -> bool:
    """Whether this rank ends a Ctrl-C quietly: torchrun passes the interrupt to every rank, rank 0 says it."""
    return launched_world() > 1 and not is_main_rank()


# What gloo and NCCL say when another rank of the run has gone (it failed, or was interrupted first)
PEER_LOST = (
    "connection closed by peer",
    "connection reset by peer",
    "remote worker crashing",
    "remote process exited",
    "communicator was aborted",
)


def lost_peer(err: BaseException) -> bool:
    """Whether `err` only says that another rank has gone (that rank reports its own cause)."""
    text = str(err).lower()
    return any(phrase in text for phrase in PEER_LOST)


class RankFailed(Exception):
    """An error on one rank of a multi-process run, with the rank in its message."""

    def __init__(self, rank: int, world: int, err: BaseException):
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if lost_peer(err):  # a consequence: the rank that went first has printed the cause
            text = f"rank {rank} of {world} stopped: another rank ended the run first (its error says why)"
        else:
            text = f"rank {rank} of {world} failed: {type(err).__name__}: {message}"
        super().__init__(text)
        self.rank, self.original = rank, err


def device_type_for(device: str) -> str:
    """The device type the ranks run on (--device auto: CUDA when there is one)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


class RankRuntime:
    """This rank's part of a multi-process run: its groups and the hooks the run uses."""

    def __init__(self, context: ParallelContext, options: ParallelOptions):
        self.context, self.options = context, options
        self.layout = context.layout
        self._sequence: SequenceParallel | None = None
        self.cfg_exchange: CfgParallel | None = None
        if self.layout.ulysses > 1:
            from wan.distributed.sequence import SequenceParallel

            self._sequence = SequenceParallel.for_group(context.ulysses_group)
        if self.layout.cfg_parallel:
            from wan.distributed.cfg import CfgParallel

            self.cfg_exchange = CfgParallel.for_group(context.cfg_group)

    @classmethod
    def start(cls, layout: ParallelLayout, options: ParallelOptions, device: str) -> RankRuntime:
        """Join the torchrun world: NCCL on `cuda:LOCAL_RANK`, gloo on the CPU."""
        from wan.distributed.context import ParallelContext

        return cls(ParallelContext.initialize(layout, device_type_for(device)), options)

    # -- roles ------------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.context.rank

    @property
    def is_main(self) -> bool:
        return self.context.is_main

    @property
    def is_writer(self) -> bool:
        return self.context.is_writer

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def sequence(self) -> SequenceParallel | None:
        return self._sequence

    # -- hooks ------------------------------------------------------------------------------------

    def models(self, provider: Any) -> Any:
        """The model provider whose models shard their tokens over this rank's Ulysses group."""
        from magcache_generate.dit_runtime import ConfiguredModels

        def configure(model: Any) -> None:
            model.sequence_parallel = self._sequence

        return ConfiguredModels(provider, configure)

    def weight_sharder(self) -> Callable[[Any], None] | None:
        """With --dit-fsdp: what splits a DiT's weights over this rank's Ulysses group as it loads (each
        rank then reads and holds only its rows); None without."""
        if not self.options.dit_fsdp:
            return None
        from wan.distributed.fsdp import shard_weights

        group, device_type = self.context.ulysses_group, self.device.type
        return lambda model: shard_weights(model, group, device_type)

    @property
    def memory_shards(self) -> tuple[int, int]:
        """What this rank holds of a forward, for the memory plan: 1/ulysses of the tokens, and with
        --dit-fsdp 1/ulysses of every block's weights."""
        ulysses = self.layout.ulysses
        return ulysses, ulysses if self.options.dit_fsdp else 1

    def share(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (the requests, with any random seed drawn once)."""
        return self.context.broadcast_object(value, src=0)

    def share_in_replica(self, make: Callable[[], Any]) -> Any:
        """`make()` run on the replica's writer only, its value given to the replica's other ranks
        (--t5-fsdp: one rank encodes the text and shares the context)."""
        import torch.distributed as dist

        value = make() if self.is_writer else None
        box = [value]
        dist.broadcast_object_list(
            box, src=self.layout.writer(self.context.role.replica), group=self.replica_group
        )
        return box[0]

    @property
    def replica_group(self) -> Any:
        return self.context.replica_group

    def item_indices(self, count: int) -> list[int]:
        """The prompt-file items this rank's replica generates."""
        return self.context.items(count)

    def gather_results(self, indices: Sequence[int], results: Sequence[dict], count: int) -> list[dict]:
        """Every replica's results, in item order, on every rank (the writers' records)."""
        mine = list(zip(indices, results, strict=True)) if self.is_writer else []
        merged: dict[int, dict] = {}
        for part in self.context.gather_objects(mine):
            merged.update(dict(part))
        return [merged[i] for i in range(count)]

    def sidecar_record(self, peak_memory: dict[str, Any]) -> dict[str, Any]:
        """The sidecar's `parallel` entry: world size, layout, and each rank's peak memory (all ranks
        of the replica take part: a collective)."""
        peaks = self.context.gather_objects((self.rank, peak_memory), group=self.replica_group)
        return {
            **self.layout.to_json(),
            "backend": "nccl" if self.device.type == "cuda" else "gloo",
            "replica": self.context.role.replica,
            "dit_fsdp": "blocks sharded over the Ulysses group (FSDP2)" if self.options.dit_fsdp else False,
            "t5_fsdp": "encode on one rank per replica, context broadcast" if self.options.t5_fsdp else False,
            "peak_memory_by_rank": {str(rank): peak for rank, peak in peaks},
        }

    def merge_magcache_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The MagCache call counts of the whole CFG-parallel group (each half caches only its own
        branch: the cond half's cond calls and the uncond half's uncond calls), in the single-process
        order (expert, then branch). A collective over the CFG group; unchanged without one."""
        if self.cfg_exchange is None:
            return calls
        cond_half, uncond_half = self.context.gather_objects(calls, group=self.context.cfg_group)
        merged = [c for c in cond_half if c["branch"] == "cond"]
        merged += [c for c in uncond_half if c["branch"] == "uncond"]
        experts = list(dict.fromkeys(c["expert"] for c in cond_half + uncond_half))
        return sorted(merged, key=lambda c: (experts.index(c["expert"]), c["branch"] != "cond"))

    def merge_calibration(self, collector: Any) -> None:
        """The calibration recordings of every replica into `collector` (their writers' copies)."""
        mine = (collector.recordings, collector.prompts) if self.is_writer else ([], [])
        recordings, prompts = [], []
        for part_recordings, part_prompts in self.context.gather_objects(mine):
            recordings += part_recordings
            prompts += part_prompts
        collector.recordings, collector.prompts = recordings, prompts

    def close(self) -> None:
        self.context.close()


def with_device(requests: Sequence[Any], device: torch.device) -> list[Any]:
    """Each rank runs on its own device (cuda:LOCAL_RANK), whatever --device named."""
    return [dataclasses.replace(r, device=str(device)) for r in requests]
