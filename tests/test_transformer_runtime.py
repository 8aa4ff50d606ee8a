"""The transformer's run-time behaviour: token chunks, the float32 RoPE, per-token timesteps without
host reads, no synchronising ops in a sampling step, and --compile (CPU)."""

import pytest
import torch
from test_transformer import inputs, make
from torch.utils._python_dispatch import TorchDispatchMode

from wan.conditioning import Conditioning, first_frame_mask
from wan.modules.compile import BlockCompiler
from wan.modules.rope import apply_rope, axis_dims, grid_rope
from wan.modules.transformer import CHUNK_MULTIPLE, TokenTimesteps
from wan.sampling import sample
from wan.schedule import make_schedule
from wan.testing.models import StaticModels
from wan.testing.reference import rope_table

GRID = dict(f=3, h=16, w=22)  # 3 x 8 x 11 = 264 tokens


def per_token_t(n: int, first: int) -> TokenTimesteps:
    dense = torch.full((1, n), 700.0)
    dense[0, :first] = 0.0
    return TokenTimesteps.from_dense(dense)


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
def test_chunked_forward_equals_unchunked_bit_for_bit(model_type):
    model = make(model_type)
    x, ctx, y = inputs(model, **GRID)
    t = per_token_t(264, 88) if model_type == "ti2v" else torch.tensor([700])
    with torch.no_grad():
        ref = model(x, t, ctx, y)
        for chunk in (16, 48, 100, 256, 5000):
            model.activation_chunk = chunk
            assert torch.equal(model(x, t, ctx, y), ref), chunk


def test_activation_chunk_is_validated_and_aligned():
    model = make("t2v")
    assert model.activation_chunk is None
    model.activation_chunk = 1000
    assert model.activation_chunk == 1000 - 1000 % CHUNK_MULTIPLE
    model.activation_chunk = 3
    assert model.activation_chunk == CHUNK_MULTIPLE
    model.activation_chunk = None
    assert model.activation_chunk is None
    for bad in (0, -5, 2.5, True, "64"):
        with pytest.raises(ValueError, match="activation_chunk"):
            model.activation_chunk = bad


def test_bf16_chunked_forward_stays_close():
    model = make("t2v").to(torch.bfloat16)
    x, ctx, _ = inputs(model, **GRID)
    with torch.no_grad():
        ref = model(x, torch.tensor([700]), ctx)
        model.activation_chunk = 64
        out = model(x, torch.tensor([700]), ctx)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()


# ---------------------------------------------------------------------------------------------------
# RoPE


def upstream_rope(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Upstream's rotation: complex128 table rows per axis, x in float64, result float32."""
    f, h, w = grid
    d = x.shape[-1]
    table = rope_table(d)
    split = [n // 2 for n in axis_dims(d)]
    ft, fh, fw = table.split(split, dim=1)
    freqs = torch.cat(
        [
            ft[:f, None, None].expand(f, h, w, -1),
            fh[None, :h, None].expand(f, h, w, -1),
            fw[None, None, :w].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).float()


def test_float32_rope_matches_upstream_float64_rotation():
    grid = (3, 5, 7)
    x = torch.randn(2, 105, 4, 128, generator=torch.Generator().manual_seed(0))
    rope = grid_rope(128, grid)
    assert rope.rotation.dtype == torch.complex64 and rope.rotation.shape == (105, 64)
    assert rope.cos.dtype == torch.float32 and rope.num_tokens == 105
    ours = apply_rope(x, rope)
    ref = upstream_rope(x, grid)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 2e-6 * ref.abs().max()
    # a token chunk rotated alone gives the same values
    assert torch.equal(apply_rope(x[:, 40:90].clone(), rope, start=40), ours[:, 40:90])
    # bf16 input: rotated in float32 (the upcast is exact)
    xb = x.bfloat16()
    assert torch.equal(apply_rope(xb, rope), apply_rope(xb.float(), rope))


def test_rope_table_is_cached_per_grid_and_device():
    assert grid_rope(64, (2, 3, 4)) is grid_rope(64, (2, 3, 4))
    assert grid_rope(64, (2, 3, 4)) is not grid_rope(64, (2, 3, 5))


VIEWS = {"unsqueeze", "view", "view_as_complex", "view_as_real", "slice", "alias"}


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def test_rope_builds_no_table_while_rotating():
    """The complex table is built once per grid; a rotation only reads rows of it (no torch.complex,
    cos or sin per call): one float32 copy, one complex product in place on it, for the whole sequence."""
    rope = grid_rope(64, (2, 3, 4))
    x = torch.randn(1, 24, 2, 64)
    with OpNames() as ops:
        apply_rope(x, rope)
    assert not {"complex", "cos", "sin", "polar"} & set(ops.names), ops.names
    assert [n for n in ops.names if n not in VIEWS] == ["_to_copy", "mul_"], ops.names


# ---------------------------------------------------------------------------------------------------
# Per-token timesteps and host synchronisation


def test_ti2v_timesteps_are_built_without_reading_values():
    latent = torch.randn(1, 48, 3, 8, 12)
    cond = Conditioning(first_frame=torch.zeros(1, 48, 1, 8, 12))
    t = cond.model_timestep(812, latent)
    assert isinstance(t, TokenTimesteps)
    mask = first_frame_mask(latent)[:, 0, ::1, ::2, ::2]
    assert torch.equal(t.dense(), (mask * 812).flatten(1))  # upstream's per-token mask * t
    assert t.values.tolist() == [[0.0, 812.0]] and t.index.shape == (1, 3 * 4 * 6)
    plain = Conditioning().model_timestep(812, latent)
    assert plain.dtype == torch.int64 and plain.tolist() == [812]


# Ops that read a device value on the host (a synchronisation on CUDA) or have data-dependent shapes.
SYNCING_OPS = {
    "_local_scalar_dense",  # .item(), bool(tensor), int(tensor), float(tensor)
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "nonzero",
    "masked_select",
    "equal",
}


class OpRecorder(TorchDispatchMode):
    """Records the ops that run, except reads of `host_data` (the schedule, a CPU tensor by design)."""

    def __init__(self, host_data: torch.Tensor):
        super().__init__()
        self.host = host_data.untyped_storage().data_ptr()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        reads_host_data = (
            isinstance(args[0], torch.Tensor) and args[0].untyped_storage().data_ptr() == self.host
        )
        if not (name == "_local_scalar_dense" and reads_host_data):
            self.ops.add(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model_type", ["t2v", "ti2v"])
def test_a_sampling_step_reads_no_device_value_on_the_host(model_type):
    model = make(model_type)
    x, ctx, _ = inputs(model, f=2, h=4, w=6)
    cond = Conditioning(first_frame=torch.randn(1, 48, 1, 4, 6)) if model_type == "ti2v" else Conditioning()
    schedule = make_schedule("unipc", 3, 5.0)
    recorder = OpRecorder(schedule.timesteps)
    with recorder:
        sample(
            x,
            schedule,
            StaticModels({"single": model}),
            ctx,
            ctx,
            guide_scale=(5.0, 5.0),
            boundary=None,
            conditioning=cond,
        )
    assert recorder.ops & {"linear", "addmm", "mm"}  # the recorder saw the forward
    assert not recorder.ops & SYNCING_OPS, recorder.ops & SYNCING_OPS


# ---------------------------------------------------------------------------------------------------
# --compile


def test_compiled_blocks_share_graphs_and_time_compilation():
    """One compiled function for every block: a deeper model compiles no more graphs."""
    from torch._dynamo.testing import CompileCounter

    frames = []
    for layers in (2, 4):
        torch._dynamo.reset()
        counter = CompileCounter()
        model = make("t2v", num_layers=layers)
        x, ctx, _ = inputs(model, f=2, h=8, w=8)
        with torch.no_grad():
            ref = model(x, torch.tensor([700]), ctx)
            compiler = BlockCompiler(backend=counter)
            model.block_runner = compiler
            out = model(x, torch.tensor([700]), ctx)
            again = model(x, torch.tensor([700]), ctx)
        assert torch.equal(out, ref) and torch.equal(again, ref)
        # block 0 gets the strided patch embedding, the others the contiguous residual stream
        assert compiler.signatures == 2 and compiler.compile_seconds > 0
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] > 0


def test_compiled_block_with_inductor_on_cpu():
    torch._dynamo.reset()
    model = make("t2v", num_layers=1)
    x, ctx, _ = inputs(model, f=2, h=4, w=4)
    with torch.no_grad():
        ref = model(x, torch.tensor([700]), ctx)
        model.block_runner = BlockCompiler()
        out = model(x, torch.tensor([700]), ctx)
    assert (out - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"), [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)]
)
def test_rms_norm_is_upstreams_formula(x_dtype, w_dtype):
    """upstream WanRMSNorm: (x.float() * rsqrt(mean(x^2) + eps)).type_as(x) * weight."""
    from wan.modules.block import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(64, 1e-6).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
    x = (3 * torch.randn(2, 50, 64, generator=g)).to(x_dtype)
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * norm.weight
    with torch.no_grad():
        assert torch.equal(norm(x), ref)


@pytest.mark.parametrize("regime", ["fp32", "bf16-autocast", "bf16"])
def test_compiled_block_breaks_its_graph_only_at_attention(regime):
    """Only the two eager attention calls split a compiled block: no Linear, norm, modulation or RoPE
    stage may break its graph (an autocast query and `out=` views did, and on CUDA each break cost
    recompiles until torch gave up and ran the block eagerly)."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    counter = CompileCounter()
    model = make("t2v", num_layers=2)
    if regime == "bf16":
        model = model.to(torch.bfloat16)
    x, ctx, _ = inputs(model, f=2, h=8, w=8)
    ctx = ctx.to(next(model.parameters()).dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=regime == "bf16-autocast")
    with torch.no_grad(), autocast:
        ref = model(x, torch.tensor([700]), ctx)
        compiler = BlockCompiler(backend=counter)
        model.block_runner = compiler
        out = model(x, torch.tensor([700]), ctx)
    assert torch.equal(out, ref)
    reasons = list(counters["graph_break"])
    assert reasons and all("torch.compiler.disable" in reason for reason in reasons), reasons
