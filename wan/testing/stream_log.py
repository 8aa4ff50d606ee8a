"""A record of what `wan.placement.StreamedBlocks` copies and runs, for tests of the copy schedule."""

from __future__ import annotations


class StreamLog:
    """Pass as `StreamedBlocks.log` (or `Placement(log=...)`): every copy and block run, in order.

    `events`: ("copy", block, slot) when a copy is issued, ("run", block, slot or None for a resident
    block) when a block is handed to the forward; `copies`: the copied block indices."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int | None]] = []
        self.copies: list[int] = []

    def copy(self, index: int, slot: int) -> None:
        self.events.append(("copy", index, slot))
        self.copies.append(index)

    def run(self, index: int, slot: int | None) -> None:
        self.events.append(("run", index, slot))
