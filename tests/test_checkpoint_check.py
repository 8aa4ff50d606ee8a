"""Checkpoint contents against the task (torch-free), the strict check against the models (meta device),
the device check and the write check: the checks that run before any weight loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from magcache_generate.model_check import check_weights_fit_models
from magcache_generate.preflight import check_can_create_files, check_device, inspect_checkpoint
from magcache_generate.request import UserError
from wan.configs import TASKS
from wan.errors import CheckpointError
from wan.testing.text import tiny_t5_state_dict

T2V = TASKS["t2v-A14B"]
SHARD = "low_noise_model/diffusion_pytorch_model-00002-of-00002.safetensors"


@pytest.mark.parametrize("task", list(TASKS))
def test_complete_tiny_checkpoints_pass_both_stages(tmp_path, make_checkpoint, task):
    root = make_checkpoint(tmp_path / task, task)
    contents = inspect_checkpoint(root, TASKS[task])
    assert contents.root == root and set(contents.dits) == set(TASKS[task].dit_folders)
    assert contents.t5["token_embedding.weight"].dtype == "bfloat16"
    check_weights_fit_models(contents)


def refused(root: Path, fragment: str, task: str = "t2v-A14B") -> str:
    with pytest.raises(UserError) as info:
        inspect_checkpoint(root, TASKS[task])
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message
    return message


def test_files_holding_the_wrong_model(tmp_path, make_checkpoint):
    root = make_checkpoint(tmp_path / "t2v", "t2v-A14B")
    vae, t5 = root / T2V.vae_checkpoint, root / T2V.t5_checkpoint
    vae_bytes, t5_bytes = vae.read_bytes(), t5.read_bytes()

    vae.write_bytes(t5_bytes)
    message = refused(root, "holds the umT5 text encoder (models_t5_umt5-xxl-enc-bf16.pth), not a VAE")
    assert (
        message.startswith(f"'{vae}'")
        and "needs the Wan2.1 VAE (Wan2.1_VAE.pth from Wan-AI/Wan2.2-T2V-A14B)" in message
    )

    vae.write_bytes(vae_bytes)
    t5.write_bytes(vae_bytes)
    refused(root, "holds a Wan2.1 VAE (Wan2.1_VAE.pth), not the umT5 text encoder")

    t5.write_bytes(t5_bytes)
    ti2v = make_checkpoint(tmp_path / "ti2v", "ti2v-5B")
    shutil.copy(ti2v / "Wan2.2_VAE.pth", vae)
    refused(root, "holds a Wan2.2 VAE, but t2v-A14B needs the Wan2.1 VAE")


def test_transformer_of_another_task(tmp_path, make_checkpoint):
    # the A14B folders look alike: only the transformer's input channels tell them apart
    t2v = make_checkpoint(tmp_path / "t2v", "t2v-A14B")
    refused(
        t2v, "holds a t2v transformer (16 input channels), but i2v-A14B needs the i2v one (36)", "i2v-A14B"
    )
    i2v = make_checkpoint(tmp_path / "i2v", "i2v-A14B")
    shutil.rmtree(t2v / "low_noise_model")
    shutil.copytree(i2v / "low_noise_model", t2v / "low_noise_model")
    message = refused(
        t2v, "holds an i2v transformer (36 input channels), but t2v-A14B needs the t2v one (16)"
    )
    assert message.startswith(f"'{t2v / 'low_noise_model'}'")


def test_parts_that_do_not_fit_together(tmp_path, make_checkpoint):
    root = make_checkpoint(tmp_path / "t2v", "t2v-A14B")
    t5 = root / T2V.t5_checkpoint
    torch.save(tiny_t5_state_dict(vocab_size=64, dim=48, dtype=torch.bfloat16), t5)
    refused(root, "takes text features of width 32 but")


def test_shards_that_disagree_with_the_index(tmp_path, make_checkpoint):
    root = make_checkpoint(tmp_path / "t2v", "t2v-A14B")
    shard = root / SHARD
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(shard))
    refused(
        root, f"lacks tensor {dropped!r} that diffusion_pytorch_model.safetensors.index.json places there"
    )

    first = root / SHARD.replace("00002-of", "00001-of")
    save_file({**tensors, **load_file(first)}, str(shard))  # now repeats the first shard's tensors
    refused(root, "repeats tensor")


def test_truncated_shard_and_bad_config(tmp_path, make_checkpoint):
    root = make_checkpoint(tmp_path / "t2v", "t2v-A14B")
    shard = root / SHARD
    shard.write_bytes(shard.read_bytes()[:-100])
    refused(root, "(a transformer shard) is truncated: tensor")
    root = make_checkpoint(tmp_path / "t2v2", "t2v-A14B")
    (root / "high_noise_model/config.json").write_text("{oops")
    refused(root, "config.json' is not valid JSON")


# ---------------------------------------------------------------------------------------------------
# The strict stage: every key and shape, against the models built on the meta device


def test_strict_check_finds_what_the_cheap_one_cannot(tmp_path, make_checkpoint):
    root = make_checkpoint(tmp_path / "t2v", "t2v-A14B")
    vae = root / T2V.vae_checkpoint
    state = torch.load(vae, weights_only=True)
    missing = sorted(k for k in state if k.startswith("decoder."))[-1]
    torch.save({k: v for k, v in state.items() if k != missing}, vae)
    contents = inspect_checkpoint(root, T2V)  # the markers are all there
    with pytest.raises(CheckpointError, match=f"key '{missing}' is missing"):
        check_weights_fit_models(contents)

    root = make_checkpoint(tmp_path / "t2v2", "t2v-A14B")
    t5 = root / T2V.t5_checkpoint
    state = torch.load(t5, weights_only=True)
    state["blocks.0.attn.q.weight"] = state["blocks.0.attn.q.weight"][:, :16].clone()
    torch.save(state, t5)
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.attn\.q\.weight' has shape"):
        check_weights_fit_models(inspect_checkpoint(root, T2V))

    root = make_checkpoint(tmp_path / "t2v3", "t2v-A14B")
    shard = root / SHARD
    tensors = load_file(shard)
    key = next(k for k in sorted(tensors) if k.startswith("blocks.1."))
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=f"tensor '{key}' has shape \\[3, 3\\]"):
        check_weights_fit_models(inspect_checkpoint(root, T2V))


def test_inspection_reads_no_tensor_data(tmp_path, make_checkpoint, monkeypatch):
    root = make_checkpoint(tmp_path / "t2v", "t2v-A14B")

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("safetensors.safe_open", forbidden)
    monkeypatch.setattr("wan.checkpoint_reader.MappedSafetensors.tensor", forbidden)  # the only data read
    check_weights_fit_models(inspect_checkpoint(root, T2V))


def test_a_pickle_the_reader_does_not_model_is_left_to_torch(tmp_path, make_checkpoint, monkeypatch):
    from wan import checkpoint_reader

    # as if torch.save had written a global the torch-free reader does not know
    monkeypatch.delitem(checkpoint_reader.PICKLE_GLOBALS, ("torch._utils", "_rebuild_tensor_v2"))
    root = make_checkpoint(tmp_path / "t2v", "t2v-A14B")
    contents = inspect_checkpoint(root, T2V)  # not refused: torch.load(weights_only=True) may read it
    assert contents.t5 is None and contents.vae is None
    check_weights_fit_models(contents)  # read by torch (memory-mapped) and checked in full

    shutil.copyfile(root / T2V.t5_checkpoint, root / T2V.vae_checkpoint)
    with pytest.raises(UserError, match="holds the umT5 text encoder"):  # the same verdicts, one stage later
        check_weights_fit_models(inspect_checkpoint(root, T2V))


# ---------------------------------------------------------------------------------------------------
# Device and output location


def test_device_check(monkeypatch):
    check_device("cpu")
    check_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError, match="--device cuda: this PyTorch build has no CUDA support"):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(UserError, match="--device cuda:1: no CUDA device is visible"):
        check_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda")
    check_device("cuda:0")
    with pytest.raises(
        UserError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"
    ):
        check_device("cuda:3")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_check_on_a_real_gpu():
    count = torch.cuda.device_count()
    check_device("cuda")
    check_device(f"cuda:{count - 1}")
    with pytest.raises(UserError, match=f"--device cuda:{count}: this machine has {count} CUDA device"):
        check_device(f"cuda:{count}")


def test_write_check_leaves_nothing(tmp_path):
    check_can_create_files(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_write_check_catches_what_permission_bits_miss():
    # os.access says yes for root, but no file can be created in /proc
    with pytest.raises(UserError, match="cannot create files in '/proc'"):
        check_can_create_files(Path("/proc"))
