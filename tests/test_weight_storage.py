"""Weight storage (wan.weight_storage): the Linears that bf16 autocast casts on every call are stored in
bf16, and that changes no value. Proved on the CPU, where `torch.autocast("cpu", bfloat16)` runs the
same casts: the parameter set is derived from what a forward does to each float32 parameter, and
float32 models and bf16-stored models give bit-identical outputs for t2v, i2v and ti2v with an image,
with and without a LoRA merged, resident and streamed through the fake device split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import MODULES, lowrank_factors, write_lora
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import wan
import wan.memory_costs as costs
import wan.placement as placement_module
from magcache_generate import cli
from magcache_generate.budget import memory_request
from magcache_generate.validate import GenerateOptions, build_request
from wan.configs import TASKS
from wan.experts import ExpertPool
from wan.lora import LoraSpec, build_merge
from wan.memory_plan import MemoryRequest, plan_memory
from wan.modules.transformer import TokenTimesteps, WanTransformer
from wan.placement import BlockLayout, Placement, streamed_source
from wan.testing.checkpoint import write_tiny_checkpoint
from wan.testing.dit import tiny_transformer_config, write_transformer_folder
from wan.testing.real_width import real_transformer_config
from wan.weight_storage import FLOAT32_READ, WeightStorage, autocast_consumed

CPU = torch.device("cpu")
BF16 = torch.bfloat16
LAYERS = 3
MIXED = WeightStorage(torch.float32, autocast=BF16)  # what a float32 run on CUDA uses, here on the CPU
CASES = ("t2v", "i2v", "ti2v-image")


def model_type(case: str) -> str:
    return case.split("-")[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dits")
    return {
        kind: write_transformer_folder(
            root / kind, tiny_transformer_config(kind, num_layers=LAYERS), seed=3, shards=2
        )
        for kind in ("t2v", "i2v", "ti2v")
    }


def forward_inputs(case: str, cfg) -> tuple:
    """(x, t, context, y): ti2v-image runs frame 0 at timestep 0 (per-token timesteps), i2v takes y."""
    gen = torch.Generator().manual_seed(11)
    frames, h, w = 3, 8, 8
    x = torch.randn(1, 16 if cfg.model_type == "i2v" else cfg.in_dim, frames, h, w, generator=gen)
    y = torch.randn(1, 20, frames, h, w, generator=gen) if cfg.model_type == "i2v" else None
    context = [torch.randn(7, cfg.text_dim, generator=gen)]
    t: torch.Tensor | TokenTimesteps = torch.tensor([731])
    if case == "ti2v-image":
        per_frame = (h // 2) * (w // 2)
        index = torch.ones(1, frames * per_frame, dtype=torch.int64)
        index[:, :per_frame] = 0
        t = TokenTimesteps(torch.tensor([[0.0, 731.0]]), index)
    return x, t, context, y


def run_autocast(model: WanTransformer, inputs: tuple) -> torch.Tensor:
    x, t, context, y = inputs
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        return model(x, t, context, y)


# ----------------------------------------------------------------------------------------------------
# The rule, derived from the forward itself


class Float32Uses(TorchDispatchMode):
    """Records every op that reads a float32 parameter (as dispatched, i.e. after autocast's casts)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        super().__init__()
        self.names = {p.data_ptr(): name for name, p in params.items()}
        self.uses: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for arg in [*args, *kwargs.values()]:
            for tensor in arg if isinstance(arg, list | tuple) else (arg,):
                name = isinstance(tensor, torch.Tensor) and self.names.get(tensor.data_ptr())
                if name and tensor.dtype == torch.float32:
                    self.uses.setdefault(name, set()).add(self.describe(func, args, kwargs))
        return func(*args, **kwargs)

    @staticmethod
    def describe(func, args, kwargs) -> str:
        target = kwargs.get("dtype", args[1] if func is torch.ops.aten.to.dtype else None)
        if func in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default) and target is not None:
            return f"cast to {target}"
        return str(func)


@pytest.mark.parametrize("case", CASES)
def test_the_bf16_set_is_exactly_what_autocast_only_casts(folders, case):
    """A parameter is stored in bf16 iff the forward does nothing with its float32 value except cast
    it to bf16; every other parameter is read in float32 somewhere (so must stay float32)."""
    model = wan.load_transformer(folders[model_type(case)])
    params = dict(model.named_parameters())
    with Float32Uses(params) as recorder:
        run_autocast(model, forward_inputs(case, model.config))
    assert set(recorder.uses) == set(params)  # every parameter is read
    only_cast = {name for name, uses in recorder.uses.items() if uses == {"cast to torch.bfloat16"}}
    assert only_cast == {name for name in params if autocast_consumed(name)}
    assert {name.partition(".")[0] for name in only_cast} == {"blocks", "patch_embedding", "text_embedding"}


def test_rule_names():
    consumed = [
        "blocks.0.self_attn.q.weight",
        "blocks.12.cross_attn.o.bias",
        "blocks.3.ffn.0.weight",
        "blocks.3.ffn.2.bias",
        "text_embedding.0.weight",
        "text_embedding.2.bias",
        "patch_embedding.weight",
    ]
    kept = [
        "blocks.0.modulation",
        "blocks.0.norm3.weight",
        "blocks.0.self_attn.norm_q.weight",
        "blocks.0.cross_attn.norm_k.weight",
        "time_embedding.0.weight",
        "time_projection.1.bias",
        "head.head.weight",
        "head.modulation",
        "xblocks.0.ffn.0.weight",
    ]
    assert all(autocast_consumed(k) for k in consumed) and not any(autocast_consumed(k) for k in kept)
    assert (
        MIXED.dtype_of("blocks.0.ffn.0.weight") == BF16
        and MIXED.dtype_of("head.head.weight") == torch.float32
    )
    plain = WeightStorage(torch.float32)
    assert plain.dtype_of("blocks.0.ffn.0.weight") == torch.float32 and not plain.mixed


def test_the_run_regimes():
    cuda, cpu = torch.device("cuda", 0), CPU
    assert WeightStorage.for_run(torch.float32, cuda) == MIXED
    assert WeightStorage.for_run(torch.float32, cpu) == WeightStorage(torch.float32)  # the goldens' regime
    assert WeightStorage.for_run(BF16, cuda) == WeightStorage(BF16)  # --convert-model-dtype: all bf16
    assert MIXED.describe() == "fp32 (Linears stored bf16 for autocast)"
    assert WeightStorage(BF16).describe() == "bf16" and WeightStorage(torch.float32).describe() == "fp32"


# ----------------------------------------------------------------------------------------------------
# Bit identity under autocast


@pytest.fixture(scope="module")
def loras(folders, tmp_path_factory):
    """kind -> a LoRA on Linears of both kinds (autocast-consumed, and float32 ones) and a modulation."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for kind in folders:
        cfg = tiny_transformer_config(kind, num_layers=LAYERS)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in WanTransformer(cfg).state_dict().items()}
        gen = torch.Generator().manual_seed(2)
        extra = {
            f"diffusion_model.{key}.diff": torch.randn(shapes[f"{key}.weight"], generator=gen) * 0.05
            for key in ("text_embedding.0", "head.head", "time_projection.1")
        }
        extra["diffusion_model.blocks.1.modulation.diff"] = torch.randn(
            shapes["blocks.1.modulation"], generator=gen
        )
        factors = lowrank_factors(shapes, MODULES, rank=4, seed=7, blocks=LAYERS)
        out[kind] = write_lora(root / f"{kind}.safetensors", factors, "kohya", alpha=4.0, extra=extra)
    return out


def load(folder: Path, storage: WeightStorage, lora: Path | None, resident: int | None) -> WanTransformer:
    return wan.load_transformer(
        folder,
        storage=storage,
        placement=Placement(CPU, resident_blocks=resident, pin=False),
        transform=build_merge(folder, [LoraSpec(lora, 0.8)]) if lora is not None else None,
    )


@pytest.mark.parametrize("resident", [None, 1], ids=["resident", "streamed"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("case", CASES)
def test_bf16_stored_linears_are_bit_identical_under_autocast(folders, loras, case, with_lora, resident):
    kind = model_type(case)
    lora = loras[kind] if with_lora else None
    reference = load(folders[kind], WeightStorage(torch.float32), lora, resident=None)
    stored = load(folders[kind], MIXED, lora, resident)
    inputs = forward_inputs(case, reference.config)

    expected = run_autocast(reference, inputs)
    for _ in range(2):  # streamed: the device buffers are refilled on the second call
        assert torch.equal(run_autocast(stored, inputs), expected)

    # stored once, rounded once: the bf16 copies autocast would make, the float32 rest untouched
    ref_state, got = reference.state_dict(), stored.state_dict()
    assert set(got) == set(ref_state)
    for key, value in got.items():
        if autocast_consumed(key):
            assert value.dtype == BF16 and torch.equal(value, ref_state[key].to(BF16)), key
        else:
            assert value.dtype == torch.float32 and torch.equal(value, ref_state[key]), key


def test_streamed_blocks_hold_one_host_tensor_per_storage_dtype(folders):
    model = load(folders["t2v"], MIXED, None, resident=1)
    source = streamed_source(model)
    for index in (1, 2):
        flats = source.host[index].flats
        assert [f.dtype for f in flats] == [torch.float32, BF16]  # modulation comes first in the block
        owners = {f.untyped_storage().data_ptr(): f.dtype for f in flats}
        for name, param in model.blocks[index].named_parameters():
            assert owners[param.untyped_storage().data_ptr()] == param.dtype, name
        params = list(model.blocks[index].parameters())
        linear_bytes = sum(p.numel() * 2 for p in params if p.dtype == BF16)
        assert linear_bytes and sum(f.numel() * f.element_size() for f in flats) >= linear_bytes


def test_page_locking_failure_with_mixed_storage_stays_exact(folders, failing_page_lock, monkeypatch):
    calls = failing_page_lock
    warnings = []
    model = wan.load_transformer(
        folders["t2v"],
        storage=MIXED,
        placement=Placement(CPU, resident_blocks=1, pin=True),
        on_warning=warnings.append,
    )
    monkeypatch.undo()  # the same monkeypatch as the fixture's: CUDA is real again below
    assert len(calls) == 1 and len(warnings) == 1  # the first failure stops all further tries
    assert not any(block.pinned for block in streamed_source(model).host.values())
    inputs = forward_inputs("t2v", model.config)
    reference = load(folders["t2v"], WeightStorage(torch.float32), None, resident=None)
    assert torch.equal(run_autocast(model, inputs), run_autocast(reference, inputs))


def test_expert_pool_loads_in_its_storage(folders):
    pool = ExpertPool(
        {"single": folders["t2v"]},
        dtype=torch.float32,
        device=CPU,
        offload=False,
        keep_inactive=False,
        storage=MIXED,
    )
    model = pool.activate("single")
    assert model.blocks[0].ffn[0].weight.dtype == BF16 and model.blocks[0].modulation.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# Through the CLI: the default regime with CPU autocast standing in for CUDA


class Float32UnderAutocast(WeightStorage):
    """The reference: float32 parameters under bf16 autocast, nothing stored in bf16."""

    def dtype_of(self, key: str) -> torch.dtype:
        return self.dtype


def test_cli_run_with_bf16_linears_equals_float32_under_autocast(tmp_path_factory, monkeypatch):
    ckpt = write_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "t2v", "t2v-A14B", seed=4, num_layers=LAYERS
    )
    out = tmp_path_factory.mktemp("out")

    def generate(name: str, storage: WeightStorage) -> dict:
        monkeypatch.setattr(WeightStorage, "for_run", classmethod(lambda cls, *args, **kwargs: storage))
        argv = ["--ckpt-dir", str(ckpt), "--save-file", str(out / f"{name}.mp4"), "--device", "cpu"]
        argv += ["--save-frames", str(out / name), "--size", "832*480", "--frame-num", "1"]
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, "--sample-steps", "3", "--base-seed", "3"])
        assert exit_info.value.code == 0
        return json.loads((out / f"{name}.json").read_text())

    generate("reference", Float32UnderAutocast(torch.float32, autocast=BF16))
    stored = generate("stored", MIXED)
    frames = {
        n: np.stack([np.asarray(Image.open(p)) for p in sorted((out / n).glob("*.png"))])
        for n in ("reference", "stored")
    }
    assert frames["reference"].shape[0] == 1 and np.array_equal(frames["reference"], frames["stored"])
    assert stored["weights"] == "fp32 (Linears stored bf16 for autocast)" and stored["dtype"] == "float32"


# ----------------------------------------------------------------------------------------------------
# The planner counts what is stored


@pytest.mark.parametrize("kind", ["t2v", "i2v", "ti2v"])
def test_planner_parameter_classes_match_the_rule(kind):
    cfg = tiny_transformer_config(kind, num_layers=2)
    with torch.device("meta"):
        state = WanTransformer(cfg).state_dict()

    def count(keys) -> int:
        return sum(state[k].numel() for k in keys)

    block = [k for k in state if k.startswith("blocks.0.")]
    rest = [k for k in state if not k.startswith("blocks.")]
    assert count(block) == costs.block_params(cfg.dim, cfg.ffn_dim)
    assert count(k for k in block if autocast_consumed(k)) == costs.block_linear_params(cfg.dim, cfg.ffn_dim)
    assert count(rest) == costs.nonblock_params(cfg)
    assert count(k for k in rest if autocast_consumed(k)) == costs.nonblock_linear_params(cfg)
    assert count(k for k in rest if FLOAT32_READ.fullmatch(k)) == costs.float32_read_params(cfg)


def test_float32_read_linears_are_widened_once_at_load(folders):
    """With bf16 parameters the time MLPs and the head Linear (read in float32 on every call) are stored
    as float32 holding their bf16 values: the forward casts no weight, and the output is the one
    of a model whose every parameter is bf16."""
    folder = folders["t2v"]
    model = wan.load_transformer(folder, dtype=BF16)
    widened = {k for k, v in model.state_dict().items() if v.dtype == torch.float32}
    assert widened == {k for k in model.state_dict() if FLOAT32_READ.fullmatch(k)} and widened
    plain = wan.load_transformer(folder, dtype=BF16)
    plain.to(BF16)  # every parameter bf16: the forward casts the float32-read weights on each call
    for key in widened:
        assert torch.equal(model.state_dict()[key], plain.state_dict()[key].float())
    x, t, ctx, y = forward_inputs("t2v", model.config)
    casts = CastCounter()
    with torch.no_grad():
        with casts:
            out = model(x, t, [c.to(BF16) for c in ctx], y)
        assert torch.equal(out, plain(x, t, [c.to(BF16) for c in ctx], y))
    matrices = {tuple(model.state_dict()[k].shape) for k in widened if k.endswith(".weight")}
    assert not [shape for shape in casts.shapes if shape in matrices]  # (biases share the norms' shape)


class CastCounter(TorchDispatchMode):
    """Shapes of the tensors cast bf16 -> float32 under it."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_float32 = kwargs.get("dtype") == torch.float32
        if func is torch.ops.aten._to_copy.default and args[0].dtype == BF16 and to_float32:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **kwargs)


def a14b_request(**kw) -> MemoryRequest:
    dit = real_transformer_config("t2v-A14B")
    return MemoryRequest(TASKS["t2v-A14B"], dit, 832, 480, 81, budget=80 * costs.GIB, **kw)


def test_the_default_regime_plans_about_half_the_weights():
    fp32 = a14b_request(weight_bytes=4)
    default = a14b_request(weight_bytes=4, autocast_linear_bytes=2)
    bf16 = a14b_request(weight_bytes=2)
    ratio = costs.block_bytes(default) / costs.block_bytes(fp32)
    assert 0.5 < ratio < 0.5001  # norms and modulation (12 x dim per block) stay float32
    assert costs.block_bytes(bf16) < costs.block_bytes(default) < 1.0002 * costs.block_bytes(bf16)
    assert costs.nonblock_bytes(bf16) < costs.nonblock_bytes(default) < costs.nonblock_bytes(fp32)
    # no bf16 autocast copies of stored-bf16 weights in flight
    assert costs.ACTIVATIONS.forward_bytes(default, None) == costs.ACTIVATIONS.forward_bytes(bf16, None)
    assert costs.ACTIVATIONS.forward_bytes(fp32, None) > costs.ACTIVATIONS.forward_bytes(default, None)
    n = default.dit.num_layers
    weights = {
        name: costs.denoise_stage(req, n, None, True) - costs.denoise_stage(req, 0, None, True)
        for name, req in (("fp32", fp32), ("default", default))
    }
    assert 0.49 < weights["default"] / weights["fp32"] < 0.51
    plan = plan_memory(default)
    assert plan.to_json()["weights"] == "fp32 (Linears stored bf16 for autocast)"
    assert "weights fp32 (Linears stored bf16 for autocast)" in plan.render()
    assert plan_memory(bf16).to_json()["weights"] == "bf16"


@pytest.mark.parametrize("task", ["t2v-A14B", "ti2v-5B"])
def test_planned_block_bytes_are_the_host_buffers(task):
    """The planner's block size equals the flat buffers a streamed block really gets (up to alignment)."""
    cfg = real_transformer_config(task, layers=1)
    with torch.device("meta"):
        block = WanTransformer(cfg).blocks[0]
    for storage, kw in ((MIXED, {"autocast_linear_bytes": 2}), (WeightStorage(torch.float32), {})):
        layout = BlockLayout.of(block, lambda name, s=storage: s.dtype_of(f"blocks.0.{name}"))
        req = MemoryRequest(TASKS[task], cfg, 832, 480, 81, budget=0, weight_bytes=4, **kw)
        padding = len(list(block.parameters())) * placement_module.ALIGN_BYTES
        assert costs.block_bytes(req) <= layout.nbytes <= costs.block_bytes(req) + padding


def test_memory_request_follows_the_device(tmp_path, tiny_checkpoint_source):
    ckpt = tiny_checkpoint_source("t2v-A14B")
    request = build_request(GenerateOptions(ckpt_dir=ckpt, save_file=tmp_path / "v.mp4", base_seed=1))
    dit = real_transformer_config("t2v-A14B")
    on_cuda = memory_request(request, dit, costs.GIB, batch=False, device="cuda")
    on_cpu = memory_request(request, dit, costs.GIB, batch=False, device="cpu")  # the simulation
    assert (on_cuda.weight_bytes, on_cuda.linear_bytes) == (4, 2)
    assert (on_cpu.weight_bytes, on_cpu.linear_bytes) == (4, 4)
    converted = build_request(
        GenerateOptions(ckpt_dir=ckpt, save_file=tmp_path / "v.mp4", base_seed=1, convert_model_dtype=True)
    )
    assert memory_request(converted, dit, costs.GIB, batch=False, device="cuda").linear_bytes == 2


# ----------------------------------------------------------------------------------------------------
# CUDA: the regime itself (run on a GPU machine with -m cuda)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("resident", [None, 1], ids=["resident", "streamed"])
@pytest.mark.parametrize("case", CASES)
def test_cuda_bf16_stored_linears_are_bit_identical(folders, loras, case, resident):
    device = torch.device("cuda")
    kind = model_type(case)
    storage = WeightStorage.for_run(torch.float32, device)
    assert storage == MIXED

    def load_on(storage: WeightStorage, resident: int | None) -> WanTransformer:
        return wan.load_transformer(
            folders[kind],
            storage=storage,
            placement=Placement(device, resident_blocks=resident),
            transform=build_merge(folders[kind], [LoraSpec(loras[kind], 0.8)], device=device),
        )

    reference, stored = load_on(WeightStorage(torch.float32), resident), load_on(storage, resident)
    x, t, context, y = forward_inputs(case, reference.config)
    if isinstance(t, TokenTimesteps):
        t = TokenTimesteps(t.values.to(device), t.index.to(device))
    else:
        t = t.to(device)
    inputs = (x.to(device), t, [c.to(device) for c in context], None if y is None else y.to(device))
    with torch.inference_mode(), storage.autocast_context(device):
        expected = reference(*inputs[:3], inputs[3])
        for _ in range(2):
            got = stored(*inputs[:3], inputs[3])
            torch.cuda.synchronize()
            assert torch.equal(got, expected)
