"""`magcache-generate` under torchrun, interrupted the way a terminal's Ctrl-C does it: rank 0, at its
third transformer call, sends SIGINT to torchrun (the ranks run in sessions of their own, so the
terminal's signal reaches torchrun alone, and torchrun passes it on to every rank). Each rank writes its
exit code to $RANK_EXIT_DIR/<rank> (run by tests/test_distributed_cli.py)."""

import os
import signal
from pathlib import Path

from magcache_generate import cli
from wan.modules.transformer import WanTransformer

rank = os.environ["RANK"]
if rank == "0":
    original = WanTransformer.forward
    calls = [0]

    def interrupted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getppid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    WanTransformer.forward = interrupted

try:
    cli.main()
except SystemExit as done:
    Path(os.environ["RANK_EXIT_DIR"], rank).write_text(str(done.code))
    raise
