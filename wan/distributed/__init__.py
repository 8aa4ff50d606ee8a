"""Running one generation over several processes with torch.distributed (launched by torchrun).

- `layout`: the parallel layout (Ulysses size x CFG groups x replicas) and its checks, torch-free;
- `context`: the process group and the rank groups of one run, created once and passed down;
- `sequence`: Ulysses sequence parallelism of the DiT (token shards, all-to-all self-attention);
- `cfg`: CFG parallelism (the cond and uncond forwards of a step on two rank groups);
- `fsdp`: the DiT's blocks sharded over a Ulysses group with FSDP2 (`fully_shard`).
"""
