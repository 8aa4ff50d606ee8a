"""The memory planner (wan.memory_plan): parameter counts, feasible and infeasible plans, monotonicity,
and its VAE formulas against exact live-byte counts of the real decode and encode."""

import dataclasses
import gc
import subprocess
import sys

import pytest
import torch

import wan.memory_costs as costs
import wan.memory_plan as mp
from wan.configs import TASKS
from wan.memory_plan import GIB, MemoryRequest, PlanInfeasibleError, plan_memory
from wan.modules.transformer import TransformerConfig, WanTransformer
from wan.testing.live_bytes import LiveBytes
from wan.vae import VaeConfig, WanVAE

A14B = TransformerConfig("t2v", 16, 16, 5120, 13824, 40, 40)
I2V = TransformerConfig("i2v", 36, 16, 5120, 13824, 40, 40)
TI2V = TransformerConfig("ti2v", 48, 48, 3072, 14336, 24, 30)


def request(task="t2v-A14B", dit=A14B, size=(832, 480), frames=81, gib=80.0, **kw):
    return MemoryRequest(TASKS[task], dit, *size, frames, budget=int(gib * GIB), weight_bytes=2, **kw)


def stages_fit(plan):
    return all(v <= plan.budget for v in plan.estimates.values())


@pytest.mark.parametrize("cfg", [A14B, I2V, TI2V], ids=["t2v", "i2v", "ti2v"])
def test_parameter_counts_match_the_model(cfg):
    small = dataclasses.replace(cfg, num_layers=2)
    with torch.device("meta"):
        model = WanTransformer(small)
    block = sum(p.numel() for p in model.blocks[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert costs.block_params(cfg.dim, cfg.ffn_dim) == block
    assert costs.nonblock_params(cfg) == total - 2 * block


def test_the_planner_does_not_import_torch():
    code = "import sys, wan.memory_plan; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_large_budget_changes_nothing():
    plan = plan_memory(request(gib=76))
    assert plan.streamed_blocks == 0 and plan.activation_chunk is None
    assert not plan.t5_on_cpu and not plan.vae_tiled and stages_fit(plan)
    assert "all 40 blocks resident" in plan.render()


def test_smaller_budgets_stream_more_blocks_and_every_stage_fits():
    previous = None
    for gib in (48, 40, 32, 24, 20, 18):
        plan = plan_memory(request(size=(1280, 720), gib=gib))
        assert stages_fit(plan), gib
        if previous is not None:
            assert plan.resident_blocks <= previous.resident_blocks
        previous = plan
    assert previous.streamed_blocks > 20 and previous.vae_tiled
    assert "streamed from host memory" in previous.render()


def test_infeasible_names_the_smallest_budget_and_the_frames_that_fit():
    req = request(size=(1280, 720), gib=8)
    need = mp.minimum_budget(req)
    with pytest.raises(PlanInfeasibleError) as err:
        plan_memory(req)
    message = str(err.value)
    assert f"needs at least {need / GIB:.1f} GiB" in message and "\n" not in message
    frames = mp.largest_frames(req)
    assert frames is not None and 1 <= frames < 81 and (frames - 1) % 4 == 0
    assert f"--frame-num {frames} or fewer" in message
    assert mp.fits(dataclasses.replace(req, frames=frames))
    assert not mp.fits(dataclasses.replace(req, frames=frames + 4))
    assert mp.fits(dataclasses.replace(req, budget=need))
    assert not mp.fits(dataclasses.replace(req, budget=need - GIB // 5))


def test_nothing_fits_a_tiny_budget():
    req = request(gib=0.5)
    assert mp.largest_frames(req) is None
    with pytest.raises(PlanInfeasibleError, match=r"needs at least .* GiB; free GPU memory"):
        plan_memory(req)
    with pytest.raises(PlanInfeasibleError, match="--convert-model-dtype"):
        plan_memory(dataclasses.replace(req, weight_bytes=4))


def test_vae_tiles_shrink_with_the_budget_and_vae_tiled_is_honoured():
    free = plan_memory(request("ti2v-5B", TI2V, (1280, 704), 121, gib=40))
    assert not free.vae_tiled
    asked = plan_memory(request("ti2v-5B", TI2V, (1280, 704), 121, gib=40, vae_tiled=True))
    assert asked.vae_tile_px == mp.DEFAULT_TILE_PIXELS
    tight = plan_memory(request("ti2v-5B", TI2V, (1280, 704), 121, gib=8))
    assert tight.vae_tiled and tight.vae_tile_px <= mp.DEFAULT_TILE_PIXELS
    assert tight.estimates["decode"] <= tight.budget


def test_text_encoder_moves_to_the_cpu_only_when_it_does_not_fit():
    assert not plan_memory(request(gib=20)).t5_on_cpu
    assert plan_memory(request(gib=20, t5_cpu=True)).t5_on_cpu
    assert plan_memory(request(gib=10, t5_bytes=11_400_000_000)).t5_on_cpu


def test_without_offload_both_experts_count():
    offload = plan_memory(request(gib=60))
    both = plan_memory(request(gib=60, offload=False))
    assert both.resident_blocks < offload.resident_blocks
    assert both.t5_on_cpu  # a text encoder held all run long would cost DiT blocks


def test_magcache_residuals_cost_memory():
    plain = plan_memory(request(size=(1280, 720), gib=24))
    cached = plan_memory(request(size=(1280, 720), gib=24, residual_cache=True))
    assert cached.resident_blocks < plain.resident_blocks


def test_the_ffn_is_chunked_only_when_that_is_what_makes_it_fit(monkeypatch):
    # coefficients where the FFN half dominates (as after the activation diet)
    monkeypatch.setattr(
        costs, "ACTIVATIONS", costs.ActivationModel(attention=10.0, modulation=12.0, ffn_hidden=8.0)
    )
    roomy = plan_memory(request(size=(1280, 720), gib=30))
    assert roomy.activation_chunk is None
    req = request(size=(1280, 720), gib=30)
    unchunked_floor = costs.denoise_stage(req, 0, None, True)
    tight = plan_memory(dataclasses.replace(req, budget=unchunked_floor - GIB))
    assert tight.activation_chunk is not None and tight.resident_blocks >= 0
    assert tight.estimates["denoise"] <= tight.budget


def test_image_tasks_plan_the_encode():
    plan = plan_memory(request("i2v-A14B", I2V, gib=40, image=True, vae_during_denoise=True))
    assert 0 < plan.estimates["encode"] <= plan.budget
    t2v = plan_memory(request(gib=40))
    assert "encode" not in t2v.estimates
    req = request("i2v-A14B", I2V, (1280, 720), gib=12, image=True)
    assert costs.encode_stage(req, 0, True) > req.budget  # no tiled encode exists
    with pytest.raises(PlanInfeasibleError):
        plan_memory(req)


def test_plan_json_is_plain_data():
    data = plan_memory(request(size=(1280, 720), gib=24)).to_json()
    assert set(data) >= {"budget_gib", "resident_blocks", "streamed_blocks", "t5_on_cpu", "vae_tile_px"}
    assert all(isinstance(v, float) for v in data["estimated_peak_gib"].values())


# ----------------------------------------------------------------------------------------------------
# The VAE formulas against the real modules (exact live bytes, meta device, real widths)


def meta_vae(kind):
    config = VaeConfig("2.1", 96, 96, 16, 2) if kind == "2.1" else VaeConfig("2.2", 160, 256, 48, 2)
    with torch.device("meta"):
        return WanVAE(config.build().eval())


def live_peak(fn):
    with torch.no_grad(), LiveBytes() as live:
        out = fn()
    del out
    gc.collect()
    return live.peak


@pytest.mark.parametrize(
    ("kind", "task", "size", "frames", "tile"),
    [
        ("2.1", "t2v-A14B", (512, 256), 5, None),
        ("2.1", "t2v-A14B", (256, 128), 5, 128),
        ("2.2", "ti2v-5B", (512, 256), 5, None),
    ],
)
def test_decode_formula_matches_the_measured_peak(kind, task, size, frames, tile):
    vae = meta_vae(kind)
    s = vae.stride[1]
    z = torch.empty(1, vae.z_dim, (frames - 1) // 4 + 1, size[1] // s, size[0] // s, device="meta")
    decode = (
        (lambda: vae.model.decode(z)) if tile is None else (lambda: vae._decode_tiled(z, tile // s, None))
    )
    measured = live_peak(decode)
    req = request(task, TI2V if kind == "2.2" else A14B, size, frames)
    model = costs.VAE_MODELS[kind]
    predicted = model.untiled_bytes(req) if tile is None else model.tiled_bytes(req, tile)
    assert measured * 0.95 <= predicted <= measured * 1.25


def test_encode_formula_matches_the_measured_peak():
    vae = meta_vae("2.1")
    video = torch.zeros(1, 3, 9, 256, 512)  # on the host, as the pipeline keeps it: chunks move
    measured = live_peak(lambda: vae.model.encode(video, torch.device("meta"), torch.float32))
    req = request("i2v-A14B", I2V, (512, 256), 9, image=True)
    predicted = costs.VAE_MODELS["2.1"].encode_bytes(req)
    assert measured * 0.95 <= predicted <= measured * 1.1


def test_a_ulysses_rank_plans_for_its_share_of_the_tokens():
    one = plan_memory(request(size=(1280, 720), gib=24.0))
    four = plan_memory(request(size=(1280, 720), gib=24.0, sequence_shards=4))
    assert four.sequence_shards == 4 and request(sequence_shards=4).rank_tokens == -(-request().tokens // 4)
    assert four.resident_blocks > one.resident_blocks  # the activations it no longer holds buy blocks
    assert stages_fit(four)
    full, shard = (costs.ACTIVATIONS.forward_bytes(request(sequence_shards=n), None) for n in (1, 4))
    assert full / 4 < shard < full / 2  # a quarter of the tokens, plus the all-to-all copies


def test_fsdp_ranks_hold_every_block_sharded():
    req = request(size=(1280, 720), gib=24.0, sequence_shards=8, weight_shards=8, offload=False)
    sharded = plan_memory(req)
    assert (sharded.resident_blocks, sharded.streamed_blocks, sharded.weight_shards) == (40, 0, 8)
    assert stages_fit(sharded)
    expert = costs.nonblock_bytes(req) + 40 * costs.block_bytes(req)
    assert costs.sharded_dit_bytes(req) < expert / 6  # 1/8 of the blocks, the embeddings and head whole
    # both experts sharded, plus the running block and the next gathered whole (once, not per expert)
    unsharded = dataclasses.replace(req, weight_shards=1, budget=int(200 * GIB))
    dit = costs.denoise_stage(req, 40, None, True) - costs.denoise_stage(unsharded, 40, None, True)
    saved = 2 * (expert - costs.sharded_dit_bytes(req)) - 2 * costs.block_bytes(req)  # before the reserve
    assert dit == pytest.approx(-saved * (1 + costs.OVERHEADS.fragmentation["denoise"]), rel=1e-3)
    # a budget where FSDP over 4 ranks does not fit: the message says what helps
    with pytest.raises(PlanInfeasibleError, match=r"a larger --ulysses-size .* or drop --dit-fsdp"):
        plan_memory(dataclasses.replace(req, sequence_shards=4, weight_shards=4))
    assert plan_memory(request(size=(1280, 720), gib=24.0, sequence_shards=4)).streamed_blocks > 0
    # one video frees its sharded experts before the decode: then 4 ranks fit the same budget
    freed = plan_memory(
        dataclasses.replace(req, sequence_shards=4, weight_shards=4, dit_freed_before_decode=True)
    )
    assert (freed.streamed_blocks, freed.weight_shards) == (0, 4) and stages_fit(freed)
