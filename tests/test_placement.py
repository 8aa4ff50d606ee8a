"""Block streaming (wan.placement): the copy schedule, bit-exactness on the CPU fake split, loading
straight into host buffers, the expert pool's parking rules, and the page-locking fallback."""

import pytest
import torch

import wan
import wan.placement as placement_module
from wan.experts import ExpertPool
from wan.placement import FlatLayout, Placement, resident_bytes, streamed_source
from wan.testing.dit import tiny_transformer_config, write_transformer_folder
from wan.testing.stream_log import StreamLog

CPU = torch.device("cpu")
LAYERS = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = tiny_transformer_config("t2v", num_layers=LAYERS)
    return write_transformer_folder(tmp_path_factory.mktemp("dit") / "m", cfg, seed=5)


def inputs(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 8, generator=gen)
    context = [torch.randn(7, cfg.text_dim, generator=gen)]
    return x, torch.tensor([731]), context


def load(folder, resident=None, **kw):
    return wan.load_transformer(
        folder, placement=Placement(CPU, resident_blocks=resident, pin=False, log=StreamLog()), **kw
    )


class SkipEverySecondCall:
    """A step cache that skips every second call without touching the blocks (as MagCache does)."""

    def __init__(self):
        self.calls = 0
        self.residual = None

    def run(self, h, blocks):
        self.calls += 1
        if self.calls % 2 == 0:
            return h + self.residual
        out = blocks(h)
        self.residual = out - h
        return out


def test_streamed_output_is_bit_exact_and_weights_are_complete(folder):
    resident = load(folder)
    streamed = load(folder, resident=2)
    assert streamed_source(resident) is None and streamed_source(streamed) is not None
    x, t, ctx = inputs(resident.config)
    with torch.inference_mode():
        expected = resident(x, t, ctx)
        for _ in range(3):  # the buffers are reused call after call
            assert torch.equal(streamed(x, t, ctx), expected)
    ref = resident.state_dict()
    got = streamed.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], v) for k, v in ref.items())


def test_schedule_which_block_is_where_and_prefetch_order(folder):
    model = load(folder, resident=2)
    source = streamed_source(model)
    # loading prefetched the first streamed block into buffer 0
    assert source.log.events == [("copy", 2, 0)] and source.log.copies == [2]
    x, t, ctx = inputs(model.config)
    with torch.inference_mode():
        model(x, t, ctx)
    assert source.log.events[1:] == [
        ("run", 0, None),
        ("run", 1, None),
        ("copy", 3, 1),  # block 3 is copied while block 2 runs
        ("run", 2, 0),
        ("copy", 4, 0),
        ("run", 3, 1),
        ("copy", 5, 1),
        ("run", 4, 0),
        ("copy", 2, 0),  # the last block prefetches the first streamed block of the NEXT call
        ("run", 5, 1),
    ]
    with torch.inference_mode():
        model(x, t, ctx)
    assert source.log.copies == [2, 3, 4, 5, 2, 3, 4, 5, 2]  # one copy per streamed block per call


def test_a_skipped_call_copies_nothing(folder):
    model = load(folder, resident=3)
    source = streamed_source(model)
    x, t, ctx = inputs(model.config)
    cache = SkipEverySecondCall()
    with torch.inference_mode():
        model(x, t, ctx, cache=cache)
        after_first = list(source.log.copies)
        model(x, t, ctx, cache=cache)  # skipped: the blocks never run
        assert source.log.copies == after_first
        model(x, t, ctx, cache=cache)  # computed: its first streamed block was prefetched already
    assert after_first == [3, 4, 5, 3] and source.log.copies == [3, 4, 5, 3, 4, 5, 3]


def test_streaming_keeps_no_history_unless_asked(folder):
    """Without a log the streamed blocks record nothing: a long batch does not grow any list."""
    model = wan.load_transformer(folder, placement=Placement(CPU, resident_blocks=2, pin=False))
    source = streamed_source(model)
    before = {name: len(v) for name, v in vars(source).items() if isinstance(v, list)}
    x, t, ctx = inputs(model.config)
    with torch.inference_mode():
        for _ in range(3):
            model(x, t, ctx)
    assert source.log is None
    assert {name: len(v) for name, v in vars(source).items() if isinstance(v, list)} == before


def test_only_the_stale_cuda_error_is_swallowed(monkeypatch):
    """After a failed cudaHostRegister the probe launch re-raises that CUDA error, which is consumed;
    any other failure (no device, a bug) propagates."""

    def raising(err):
        def probe():
            raise err

        return probe

    stale = [RuntimeError("CUDA error: out of memory")]  # older torch's spelling
    if hasattr(torch, "AcceleratorError"):
        stale.append(torch.AcceleratorError("CUDA error: out of memory"))
    for err in stale:
        monkeypatch.setattr(placement_module, "_launch_probe", raising(err))
        placement_module._consume_cuda_error()  # swallowed
    for other in (RuntimeError("Torch not compiled with CUDA enabled"), ValueError("bug")):
        monkeypatch.setattr(placement_module, "_launch_probe", raising(other))
        with pytest.raises(type(other)):
            placement_module._consume_cuda_error()


@pytest.mark.parametrize("resident", [0, 4, 5])
def test_few_streamed_blocks_stay_in_the_buffers(folder, resident):
    """With one or two streamed blocks the two buffers hold them for good: no copies after the first."""
    model = load(folder, resident=resident)
    reference = load(folder)
    source = streamed_source(model)
    x, t, ctx = inputs(model.config, seed=1)
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(model(x, t, ctx), reference(x, t, ctx))
    streamed = LAYERS - resident
    if streamed <= 2:
        assert source.log.copies == list(range(resident, LAYERS))
    else:
        assert len(source.log.copies) == 2 * streamed + 1


def test_streamed_blocks_live_in_their_host_buffer_only(folder):
    model = load(folder, resident=4, dtype=torch.bfloat16)
    source = streamed_source(model)
    for index in (4, 5):
        (flat,) = source.host[index].flats  # uniform storage: one flat tensor per block
        assert flat.dtype == torch.bfloat16
        for param in model.blocks[index].parameters():
            assert param.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    block_bytes = sum(p.numel() * p.element_size() for p in model.blocks[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert resident_bytes(model) == total - 2 * block_bytes


def test_flat_layout_aligns_every_view(folder):
    model = load(folder)
    layout = FlatLayout.of(model.blocks[0], torch.bfloat16)
    assert all(offset * 2 % placement_module.ALIGN_BYTES == 0 for _, offset, _ in layout.entries)
    assert layout.numel >= sum(p.numel() for p in model.blocks[0].parameters())


def test_page_locking_failure_degrades_to_pageable_with_one_warning(folder, failing_page_lock):
    calls = failing_page_lock
    warnings = []
    model = wan.load_transformer(
        folder, placement=Placement(CPU, resident_blocks=2, pin=True), on_warning=warnings.append
    )
    source = streamed_source(model)
    assert len(calls) == 1 and not any(block.pinned for block in source.host.values())
    assert len(warnings) == 1 and "pageable" in warnings[0]
    x, t, ctx = inputs(model.config)
    with torch.inference_mode():
        assert torch.equal(model(x, t, ctx), load(folder)(x, t, ctx))


def test_pool_streams_parks_and_reactivates(tmp_path):
    cfg = tiny_transformer_config("t2v", num_layers=LAYERS)
    paths = {n: write_transformer_folder(tmp_path / n, cfg, seed=i) for i, n in enumerate(("high", "low"))}
    pool = ExpertPool(
        paths,
        dtype=torch.float32,
        device=CPU,
        offload=True,
        keep_inactive=True,
        placement=Placement(CPU, resident_blocks=2, pin=False),
    )
    x, t, ctx = inputs(cfg)
    high = pool.activate("high")
    with torch.inference_mode():
        before = high(x, t, ctx)
    pool.activate("low")
    assert pool.activate("high") is high  # kept (batch) and re-placed
    with torch.inference_mode():
        assert torch.equal(high(x, t, ctx), before)


@pytest.mark.parametrize(("free", "kept"), [(1024, False), (10**15, True)])
def test_idle_expert_is_parked_only_when_host_ram_has_room(tmp_path, free, kept):
    cfg = tiny_transformer_config("t2v", num_layers=LAYERS)
    paths = {n: write_transformer_folder(tmp_path / n, cfg, seed=i) for i, n in enumerate(("high", "low"))}
    warnings = []
    pool = ExpertPool(
        paths,
        dtype=torch.float32,
        device=torch.device("meta"),  # stands for an accelerator: parking moves the weights to RAM
        offload=True,
        keep_inactive=True,
        host_available=lambda: free,
        on_warning=warnings.append,
    )
    pool.models["high"] = wan.load_transformer(paths["high"])
    pool.active = "high"
    pool._park("high")
    assert ("high" in pool.models) == kept
    assert bool(warnings) != kept and all("reloaded" in w for w in warnings)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streaming_matches_resident(folder):
    device = torch.device("cuda")
    resident = wan.load_transformer(folder, device=device)
    streamed = wan.load_transformer(folder, placement=Placement(device, resident_blocks=1, log=StreamLog()))
    source = streamed_source(streamed)
    assert all(source.host[i].pinned for i in source.host)
    x, t, ctx = (
        v.to(device) if isinstance(v, torch.Tensor) else [c.to(device) for c in v]
        for v in inputs(resident.config)
    )
    with torch.inference_mode():
        expected = resident(x, t, ctx)
        for _ in range(3):
            got = streamed(x, t, ctx)
            torch.cuda.synchronize()
            assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert source.log.copies[:LAYERS] == [1, 2, 3, 4, 5, 1]
