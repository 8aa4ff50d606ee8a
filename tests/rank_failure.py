"""`magcache-generate` whose rank 1 fails at its third transformer call (run by torchrun in
tests/test_distributed_cli.py): the other ranks must end too, and the failing rank be named."""

import os

from magcache_generate import cli
from wan.modules.transformer import WanTransformer

if os.environ.get("RANK") == "1":
    original = WanTransformer.forward
    calls = [0]

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    WanTransformer.forward = failing

cli.main()
