"""Rank functions for tests/test_distributed.py (module-level, so spawned processes import them)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from wan.conditioning import Conditioning
from wan.modules.transformer import WanTransformer
from wan.sampling import sample
from wan.schedule import make_schedule
from wan.testing.dit import random_transformer_state_dict, tiny_transformer_config
from wan.testing.models import StaticModels

HEADS = 6  # divisible by 1, 2 and 3
STEPS = 4


def tiny_model(model_type: str = "t2v") -> WanTransformer:
    cfg = tiny_transformer_config(model_type, num_heads=HEADS, dim=12 * HEADS)
    model = WanTransformer(cfg)
    model.load_state_dict(random_transformer_state_dict(cfg))
    return model.eval()


def inputs(model_type: str = "t2v") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Conditioning]:
    """Noise of 3 x 3 x 5 = 45 tokens (not a multiple of 2: the shards are padded), contexts, and the
    ti2v image conditioning (per-token timesteps) for model type ti2v."""
    gen = torch.Generator().manual_seed(1)
    channels = 48 if model_type == "ti2v" else 16
    noise = torch.randn(1, channels, 3, 6, 10, generator=gen)
    context = torch.randn(1, 16, 24, generator=gen)
    context_null = torch.randn(1, 16, 24, generator=gen)
    cond = Conditioning()
    if model_type == "ti2v":
        cond = Conditioning(first_frame=torch.randn(1, channels, 1, 6, 10, generator=gen))
    return noise, context, context_null, cond


def run_sampling(
    model_type: str = "t2v",
    *,
    ulysses: bool = False,
    cfg_parallel: bool = False,
    fsdp: bool = False,
    cache_factory=None,
) -> tuple[torch.Tensor, object]:
    """A 4-step sampling run of the tiny model on this process (its rank's part when distributed)."""
    model = tiny_model(model_type)
    exchange = None
    if dist.is_initialized():
        from wan.distributed.cfg import CfgParallel
        from wan.distributed.sequence import SequenceParallel

        world, rank = dist.get_world_size(), dist.get_rank()
        if cfg_parallel and ulysses:
            half = world // 2
            groups = [dist.new_group(list(range(c * half, (c + 1) * half))) for c in range(2)]
            pairs = [dist.new_group([u, u + half]) for u in range(half)]
            model.sequence_parallel = SequenceParallel.for_group(groups[rank // half])
            exchange = CfgParallel.for_group(pairs[rank % half])
        elif cfg_parallel:
            exchange = CfgParallel.for_group(dist.group.WORLD)
        elif ulysses:
            model.sequence_parallel = SequenceParallel.for_group(dist.group.WORLD)
        if fsdp:
            from wan.distributed.fsdp import shard_weights

            shard_weights(model, model.sequence_parallel.group, "cpu")
    noise, context, context_null, cond = inputs(model_type)
    cache = cache_factory(model) if cache_factory is not None else None
    latent = sample(
        noise,
        make_schedule("unipc", STEPS, 5.0),
        StaticModels({"single": model}),
        context,
        context_null,
        guide_scale=(4.0, 4.0),
        boundary=None,
        conditioning=cond,
        cache=cache,
        cfg_parallel=exchange,
    )
    return latent, cache


def sampling_rank(
    rank: int, world: int, model_type: str, ulysses: bool, cfg_parallel: bool, fsdp: bool
) -> torch.Tensor:
    return run_sampling(model_type, ulysses=ulysses, cfg_parallel=cfg_parallel, fsdp=fsdp)[0]


def sharded_load_rank(rank: int, world: int, folder: str, storage) -> tuple[list[str], int, int]:
    """Load `folder` with its weights split over the world as they arrive (`load_transformer`'s `shard`)
    and compare each parameter this rank holds with the same rows of a plain load: the names that
    differ (in dtype or value), the elements this rank holds and the model's total."""
    from wan.distributed.fsdp import is_sharded, shard_weights
    from wan.loading import load_transformer

    plain = dict(load_transformer(folder, storage=storage).named_parameters())
    model = load_transformer(
        folder, storage=storage, shard=lambda m: shard_weights(m, dist.group.WORLD, "cpu")
    )
    differ, held = [], 0
    for key, param in model.named_parameters():
        mine, want = param, plain[key]
        if is_sharded(param):  # FSDP2's split: torch.chunk on dim 0, empty past the last chunk
            chunks = torch.chunk(want, world, dim=0)
            mine, want = param.to_local(), chunks[rank] if rank < len(chunks) else want[:0]
        held += mine.numel()
        if mine.dtype != want.dtype or not torch.equal(mine.float(), want.float()):
            differ.append(key)
    return differ, held, sum(p.numel() for p in plain.values())


def released_expert_rank(rank: int, world: int, folder: str) -> tuple[bool, bool]:
    """An expert loaded sharded by `ExpertPool` and run once: is it collected after `release()` (so its
    device memory is free before the decode)? Also whether it was alive before."""
    import gc
    import weakref
    from pathlib import Path

    from wan.distributed.fsdp import shard_weights
    from wan.experts import ExpertPool

    pool = ExpertPool(
        {"": Path(folder)},
        dtype=torch.float32,
        device=torch.device("cpu"),
        offload=False,
        keep_inactive=False,
        shard=lambda m: shard_weights(m, dist.group.WORLD, "cpu"),
    )
    model = pool.activate("")
    noise, context, _, _ = inputs()
    with torch.no_grad():
        model(noise, torch.tensor([500.0]), context)  # FSDP's lazy state, hooks and buffers exist now
    alive = weakref.ref(model)
    del model
    before = alive() is not None
    pool.release()
    gc.collect()
    return before, alive() is None
