import json

import pytest
import torch
from safetensors.torch import save_file

import wan
from wan.errors import CheckpointError
from wan.loading import read_transformer_config
from wan.testing.dit import (
    random_transformer_state_dict,
    tiny_transformer_config,
    write_transformer_folder,
)
from wan.weight_storage import FLOAT32_READ


@pytest.fixture
def cfg():
    return tiny_transformer_config("t2v")


@pytest.fixture
def state(cfg):
    return random_transformer_state_dict(cfg, seed=3)


def assert_same_weights(model, state, dtype=torch.float32):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == dtype
        assert torch.equal(loaded[k], v.to(dtype)), k


def test_sharded_folder(tmp_path, cfg, state):
    folder = write_transformer_folder(tmp_path / "high_noise_model", cfg, state=state, shards=3)
    assert len(list(folder.glob("*.safetensors"))) == 3
    model = wan.load_transformer(folder)
    assert model.config == cfg
    assert_same_weights(model, state)
    assert not any(p.requires_grad for p in model.parameters())


def test_single_file_folder_and_bare_file(tmp_path, cfg, state):
    folder = write_transformer_folder(tmp_path / "m", cfg, state=state, shards=1)
    assert_same_weights(wan.load_transformer(folder), state)
    bare = tmp_path / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    save_file(state, str(bare))
    model = wan.load_transformer(bare)  # no config.json: everything read off shapes
    assert model.config.dim == cfg.dim and model.config.text_dim == cfg.text_dim
    assert model.config.model_type == "t2v"
    assert_same_weights(model, state)


def test_dtype_conversion(tmp_path, cfg, state):
    folder = write_transformer_folder(tmp_path / "m", cfg, state=state)
    model = wan.load_transformer(folder, dtype=torch.bfloat16)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        # the Linears read in float32 (time MLPs, head) hold their bf16 values widened to float32
        dtype = torch.float32 if FLOAT32_READ.fullmatch(k) else torch.bfloat16
        assert loaded[k].dtype == dtype and torch.equal(loaded[k], v.to(torch.bfloat16).to(dtype)), k


def test_text_dim_read_off_shapes_when_config_omits_it(tmp_path, cfg, state):
    folder = write_transformer_folder(tmp_path / "m", cfg, state=state)
    assert "text_dim" not in json.loads((folder / "config.json").read_text())
    assert read_transformer_config(folder).text_dim == cfg.text_dim


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        wan.load_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        wan.load_transformer(tmp_path / "empty")


def test_missing_shard(tmp_path, cfg, state):
    folder = write_transformer_folder(tmp_path / "m", cfg, state=state)
    shard = sorted(folder.glob("*-00002-of-00003.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"00002-of-00003.*missing"):
        wan.load_transformer(folder)


def test_missing_tensor(tmp_path, cfg, state):
    del state["blocks.1.ffn.2.bias"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.2\.bias.*missing"):
        wan.load_transformer(write_transformer_folder(tmp_path / "m", cfg, state=state, shards=1))


def test_unexpected_tensor(tmp_path, cfg, state):
    state["blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected tensor .blocks\.0\.extra\.weight."):
        wan.load_transformer(write_transformer_folder(tmp_path / "m", cfg, state=state, shards=1))


def test_misshaped_tensor(tmp_path, cfg, state):
    state["blocks.0.self_attn.q.bias"] = torch.zeros(cfg.dim + 1)
    with pytest.raises(CheckpointError, match=r"self_attn\.q\.bias.*shape"):
        wan.load_transformer(write_transformer_folder(tmp_path / "m", cfg, state=state, shards=1))


def test_corrupt_and_truncated_files(tmp_path, cfg, state):
    folder = write_transformer_folder(tmp_path / "m", cfg, state=state, shards=1)
    target = folder / "diffusion_pytorch_model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # truncated: header intact, data cut
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors"):
        wan.load_transformer(folder)
    target.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="has no valid safetensors header"):
        wan.load_transformer(folder)


def test_index_names_tensor_absent_from_shard(tmp_path, cfg, state):
    folder = write_transformer_folder(tmp_path / "m", cfg, state=state)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"ghost\.weight"):
        wan.load_transformer(folder)


def test_config_contradicting_weights(tmp_path, cfg, state):
    folder = write_transformer_folder(tmp_path / "m", cfg, state=state)
    raw = json.loads((folder / "config.json").read_text())
    raw["num_layers"] = 5
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="num_layers=5"):
        wan.load_transformer(folder)


def test_not_a_transformer(tmp_path):
    bare = tmp_path / "vae.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(2, 3, 3, 3, 3)}, str(bare))
    with pytest.raises(CheckpointError, match="Wan transformer"):
        wan.load_transformer(bare)
