"""Reading tensor tables from safetensors headers and torch.save pickles, without tensor data or torch."""

from __future__ import annotations

import collections
import json
import pickle
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wan.checkpoint_reader import (
    MappedSafetensors,
    ReadError,
    TensorInfo,
    UnsupportedPickle,
    load_pool,
    open_tensors,
    read_safetensors_header,
    read_table,
    read_torch_archive,
)


def saved(path: Path, obj, **kwargs) -> Path:
    torch.save(obj, path, **kwargs)
    return path


def state() -> dict[str, torch.Tensor]:
    base = torch.arange(12.0)
    return collections.OrderedDict(
        weight=torch.zeros(3, 4, dtype=torch.bfloat16),
        bias=torch.ones(5, dtype=torch.float16),
        view=base[2:8].view(2, 3),  # a view into a larger storage
        param=torch.nn.Parameter(torch.zeros(2, 2, 1)),
        index=torch.zeros(7, dtype=torch.int64),
        scalar=torch.tensor(1.5),
    )


def test_torch_archive_names_dtypes_and_shapes(tmp_path):
    table = read_table(saved(tmp_path / "m.pth", state()))
    assert table == {
        "weight": TensorInfo("bfloat16", (3, 4)),
        "bias": TensorInfo("float16", (5,)),
        "view": TensorInfo("float32", (2, 3)),
        "param": TensorInfo("float32", (2, 2, 1)),
        "index": TensorInfo("int64", (7,)),
        "scalar": TensorInfo("float32", ()),
    }
    assert read_table(saved(tmp_path / "plain.pth", dict(state()))) == table


def test_torch_archive_reads_only_the_pickle(tmp_path, monkeypatch):
    path = saved(tmp_path / "m.pth", state())
    opened = []
    original = zipfile.ZipFile.open

    def recording_open(self, name, *args, **kwargs):
        opened.append(name if isinstance(name, str) else name.filename)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", recording_open)
    read_torch_archive(path)
    assert opened == ["m/data.pkl"]  # tensor bytes (m/data/0, ...) are never opened


def test_safetensors_header_matches_safe_open(tmp_path):
    tensors = {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16), "c": torch.zeros(0, 5)}
    path = tmp_path / "s.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    table = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert {k: v.shape for k, v in table.items()} == expected
    assert table["b"].dtype == "bfloat16"
    assert read_table(path) == table  # told by content, not by name


def test_probing_imports_no_torch(tmp_path):
    pth = saved(tmp_path / "m.pth", state())
    shard = tmp_path / "s.safetensors"
    save_file({"a": torch.zeros(2)}, str(shard))
    code = (
        "import sys; from wan.checkpoint_reader import read_table as p; "
        f"p({str(pth)!r}); p({str(shard)!r}); print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (
            lambda data: data[: len(data) // 2],
            "truncated or corrupt: the zip directory at its end is missing",
        ),
        (lambda data: data[:100], "truncated or corrupt"),
        (lambda data: b"", "is empty (0 bytes)"),
        (lambda data: bytes(range(256)) * 40, "neither a torch.save archive nor a safetensors file"),
    ],
    ids=["half", "head-only", "empty", "random"],
)
def test_damaged_archives(tmp_path, damage, fragment):
    path = saved(tmp_path / "m.pth", state())
    path.write_bytes(damage(_bytes(path)))
    with pytest.raises(ReadError, match=re.escape(fragment)) as info:
        read_table(path)
    assert "\n" not in str(info.value)


def test_legacy_format_is_refused_as_the_loaders_do(tmp_path):
    path = saved(tmp_path / "old.pth", state(), _use_new_zipfile_serialization=False)
    with pytest.raises(ReadError, match="legacy"):
        read_table(path)
    with pytest.raises(RuntimeError, match="mmap"):
        torch.load(path, mmap=True, weights_only=True)


def _archive(path: Path, pickled: bytes, entries: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", pickled)
        for name, data in (entries or {}).items():
            archive.writestr(f"m/{name}", data)
    return path


def test_foreign_globals_are_refused_without_running_them(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = _archive(tmp_path / "evil.pth", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(ReadError, match=r"pickles \w+\.print, so it is not a plain state dict"):
        read_table(path)


def test_torch_globals_it_does_not_model_are_not_a_verdict(tmp_path):
    class Untyped:
        def __reduce__(self):
            return (torch.UntypedStorage, ())

    path = _archive(tmp_path / "new.pth", pickle.dumps({"x": Untyped()}, protocol=2))
    with pytest.raises(
        UnsupportedPickle, match=r"pickles torch\.\S*UntypedStorage, which this reader does not model"
    ):
        read_table(path)


def test_non_tensor_entries_and_missing_bytes(tmp_path):
    with pytest.raises(ReadError, match="entry 'step' is not a tensor"):
        read_table(_archive(tmp_path / "a.pth", pickle.dumps({"step": 3}, protocol=2)))
    with pytest.raises(ReadError, match="holds a list"):
        read_table(_archive(tmp_path / "b.pth", pickle.dumps([1, 2], protocol=2)))

    # the archive stores fewer bytes than the pickle says tensor 'w' needs
    good = saved(tmp_path / "m.pth", {"w": torch.zeros(10)})
    with zipfile.ZipFile(good) as archive:
        pickled = archive.read("m/data.pkl")
        data = archive.read("m/data/0")
    with pytest.raises(ReadError, match="tensor 'w' needs more bytes than the archive stores"):
        read_table(_archive(tmp_path / "short.pth", pickled, {"data/0": data[:8]}))
    with pytest.raises(ReadError, match="bytes of tensor 'w' are missing"):
        read_table(_archive(tmp_path / "none.pth", pickled))
    assert read_table(_archive(tmp_path / "ok.pth", pickled, {"data/0": data})) == {
        "w": TensorInfo("float32", (10,))
    }


def test_damaged_safetensors(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.zeros(64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ReadError, match="is truncated: tensor 'b' ends at byte"):
        read_safetensors_header(path)
    path.write_bytes(data[:20])
    with pytest.raises(ReadError, match="is truncated: its header needs"):
        read_safetensors_header(path)
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ReadError, match="unreadable safetensors header"):
        read_safetensors_header(path)
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ReadError, match="no valid safetensors header"):
        read_safetensors_header(path)


def test_the_pickle_walk_matches_torch_load(tmp_path):
    """The stand-in unpickler sees what torch.load sees, on a file written by this torch."""
    path = saved(tmp_path / "m.pth", state())
    loaded = torch.load(path, weights_only=True)
    table = read_torch_archive(path)
    assert list(table) == list(loaded)
    for key, tensor in loaded.items():
        assert table[key].shape == tuple(tensor.shape)
        assert table[key].dtype == str(tensor.dtype).removeprefix("torch.")


def _write_header(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def test_safetensors_dtype_names_and_wrong_dtypes(tmp_path):
    path = tmp_path / "s.safetensors"
    tensors = {
        "f32": torch.zeros(2),
        "bf16": torch.zeros(2, dtype=torch.bfloat16),
        "e4m3": torch.zeros(3, dtype=torch.float8_e4m3fn),
        "i64": torch.zeros(1, dtype=torch.int64),
    }
    save_file(tensors, str(path))
    table = read_table(path)
    assert {k: v.dtype for k, v in table.items()} == {k: str(v.dtype)[6:] for k, v in tensors.items()}
    assert all(getattr(torch, info.dtype) == tensors[k].dtype for k, info in table.items())

    # a dtype safetensors does not define, and a dtype whose width does not match the bytes stored
    bad = {"x": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(ReadError, match="tensor 'x' of unsupported dtype 'F7'"):
        read_table(_write_header(tmp_path / "bad.safetensors", bad, bytes(8)))
    wide = {"x": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(ReadError, match="is corrupt: tensor 'x' has 8 bytes for shape \\[2\\]"):
        read_table(_write_header(tmp_path / "wide.safetensors", wide, bytes(8)))


def test_open_tensors_maps_both_formats(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7, dtype=torch.float16), "empty": torch.zeros(0, 4)}
    for path in (tmp_path / "s.safetensors", tmp_path / "m.pth"):
        save_file(tensors, str(path)) if path.suffix == ".safetensors" else torch.save(tensors, path)
        with open_tensors(path) as (table, get):
            assert set(table) == set(tensors)
            for key, tensor in tensors.items():
                assert table[key].shape == tuple(tensor.shape)
                assert torch.equal(get(key), tensor) and get(key).dtype == tensor.dtype


def test_open_tensors_refuses_a_truncated_file_before_mapping_it(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file({"a": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ReadError, match="is truncated"), open_tensors(path):
        pass


def test_mapped_views_survive_close_and_release(tmp_path):
    path = tmp_path / "s.safetensors"
    big = torch.randn(4096, 8)  # spans whole pages, so release really drops some
    save_file({"big": big, "small": torch.arange(3.0)}, str(path))
    with MappedSafetensors(path) as mapped:
        view = mapped.tensor("big")
        mapped.release("big")
        assert torch.equal(view, big)  # released pages are read again from the file
    assert torch.equal(view, big)  # the map lives while a view does


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loader_gives_the_tensors_of_a_plain_read_and_cast(tmp_path, dtype):
    """The memory-mapped, threaded loader gives exactly what safetensors' load_file + a per-tensor cast
    give, and the model owns its memory (rewriting the files afterwards changes nothing)."""
    from safetensors.torch import load_file

    import wan
    from wan.testing.dit import (
        random_transformer_state_dict,
        tiny_transformer_config,
        write_transformer_folder,
    )

    cfg = tiny_transformer_config("t2v")
    folder = write_transformer_folder(
        tmp_path / "dit", cfg, state=random_transformer_state_dict(cfg, seed=5), shards=3
    )
    from wan.weight_storage import FLOAT32_READ

    def cast(key: str, value: torch.Tensor) -> torch.Tensor:
        # the Linears read in float32 (time MLPs, head) hold the run dtype's values widened to float32
        widen = FLOAT32_READ.fullmatch(key) is not None
        return value.to(dtype).to(torch.float32 if widen else dtype).clone()

    expected = {}
    for shard in sorted(folder.glob("*.safetensors")):
        expected |= {k: cast(k, v) for k, v in load_file(shard).items()}
    model = wan.load_transformer(folder, dtype=dtype)
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for shard in folder.glob("*.safetensors"):
        with shard.open("r+b") as f:  # zero the tensor bytes in place, past the header
            f.seek(8 + int.from_bytes(f.read(8), "little"))
            f.write(bytes(shard.stat().st_size - f.tell()))
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_an_interrupted_load_drops_the_queued_tensors():
    started, release, ran = threading.Event(), threading.Event(), []

    def place(i: int) -> None:
        ran.append(i)
        if i == 0:
            started.set()
            release.wait(timeout=60)  # a guard: a pool that ran the queue would hang here

    with pytest.raises(KeyboardInterrupt), load_pool(1) as pool:
        futures = [pool.submit(place, i) for i in range(8)]
        futures[1].add_done_callback(lambda _: release.set())  # runs when the queued work is dropped
        started.wait()
        raise KeyboardInterrupt
    assert ran == [0]  # the tensor in flight finished, the queued ones never ran
    assert all(f.cancelled() for f in futures[1:])
