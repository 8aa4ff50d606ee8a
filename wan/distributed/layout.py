"""The parallel layout of a run: how the ranks of a torchrun world split into groups.

Ranks are numbered replica-major: rank = replica * group_size + cfg_index * ulysses + ulysses_index,
where group_size = ulysses * (2 if cfg_parallel else 1). A Ulysses group (consecutive ranks) shares
one DiT forward, its tokens split across the ranks; the two halves of a CFG-parallel group run the
cond and the uncond forward of a step at once; replicas are independent copies that take different
prompt-file items. Torch-free, so the CLI checks a layout before importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# torchrun's environment variables (also set by any launcher that follows its protocol)
ENV_WORLD, ENV_RANK, ENV_LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"


@dataclass(frozen=True)
class ParallelLayout:
    world: int = 1
    ulysses: int = 1
    cfg_parallel: bool = False

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def group_size(self) -> int:
        """Ranks that make one generation together (one Ulysses x CFG group)."""
        return self.ulysses * self.cfg_size

    @property
    def replicas(self) -> int:
        return self.world // self.group_size

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def role(self, rank: int) -> RankRole:
        replica, inside = divmod(rank, self.group_size)
        cfg_index, ulysses_index = divmod(inside, self.ulysses)
        return RankRole(rank, replica, cfg_index, ulysses_index)

    def ulysses_ranks(self, replica: int, cfg_index: int) -> list[int]:
        start = replica * self.group_size + cfg_index * self.ulysses
        return list(range(start, start + self.ulysses))

    def cfg_ranks(self, replica: int, ulysses_index: int) -> list[int]:
        base = replica * self.group_size + ulysses_index
        return [base + c * self.ulysses for c in range(self.cfg_size)]

    def replica_ranks(self, replica: int) -> list[int]:
        return list(range(replica * self.group_size, (replica + 1) * self.group_size))

    def writer(self, replica: int) -> int:
        """The rank that decodes and writes a replica's outputs (its first)."""
        return replica * self.group_size

    def describe(self) -> str:
        parts = [f"world {self.world}", f"ulysses {self.ulysses}"]
        parts.append("cfg-parallel 2" if self.cfg_parallel else "cfg sequential")
        parts.append(f"{self.replicas} replica(s)")
        return ", ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "world_size": self.world,
            "ulysses_size": self.ulysses,
            "cfg_parallel": self.cfg_parallel,
            "replicas": self.replicas,
        }


@dataclass(frozen=True)
class RankRole:
    rank: int
    replica: int
    cfg_index: int  # 0: cond (and the writer's half), 1: uncond
    ulysses_index: int


def launched_world(environ: dict[str, str] | None = None) -> int:
    """The world size torchrun gave this process (1 when not launched by torchrun)."""
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get(ENV_WORLD, "1")))
    except ValueError:
        return 1


def launched_rank(environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        return int(env.get(ENV_RANK, "0"))
    except ValueError:
        return 0


def ulysses_sizes(num_heads: int, world: int) -> list[int]:
    """The Ulysses sizes that divide both the attention heads and the world size."""
    return [n for n in range(1, world + 1) if num_heads % n == 0 and world % n == 0]


def layout_problem(
    layout: ParallelLayout,
    *,
    num_heads: int | None,
    uses_cfg: bool | None,
    prompt_file: bool,
) -> str | None:
    """Why this layout cannot run (one line naming the input and the fix), or None.

    `num_heads`: the DiT's attention heads (None: not known yet); `uses_cfg`: whether any step runs
    the uncond forward (False when both experts' guide scale is 1); `prompt_file`: replicas need one.
    """
    if layout.ulysses < 1:
        return f"--ulysses-size {layout.ulysses}: give a positive number of ranks"
    if not layout.distributed:
        flags = [
            f
            for f, on in (("--ulysses-size", layout.ulysses > 1), ("--cfg-parallel", layout.cfg_parallel))
            if on
        ]
        if flags:
            return (
                f"{' and '.join(flags)} {'need' if len(flags) > 1 else 'needs'} several processes; launch with "
                f"torchrun --nproc-per-node N -m magcache_generate ..."
            )
        return None
    if layout.world % layout.ulysses:
        return (
            f"--ulysses-size {layout.ulysses} does not divide the world size {layout.world}; "
            f"use one of {ulysses_sizes(num_heads or layout.world, layout.world)}"
        )
    if num_heads is not None and num_heads % layout.ulysses:
        return (
            f"--ulysses-size {layout.ulysses} does not divide the model's {num_heads} attention heads; "
            f"sizes that work with world size {layout.world}: {ulysses_sizes(num_heads, layout.world)}"
        )
    if layout.cfg_parallel:
        if layout.world % (2 * layout.ulysses):
            return (
                f"--cfg-parallel needs a world size divisible by 2 x --ulysses-size "
                f"({2 * layout.ulysses}), not {layout.world}"
            )
        if uses_cfg is False:
            return (
                "--cfg-parallel with guide scale 1 for both experts: no step has an uncond forward; drop it"
            )
    if layout.replicas > 1 and not prompt_file:
        return (
            f"world size {layout.world} is {layout.replicas} copies of a {layout.group_size}-rank group, "
            f"but one prompt gives them nothing to share: pass --prompt-file, or raise --ulysses-size "
            f"(or add --cfg-parallel) so one group spans all {layout.world} ranks"
        )
    return None
