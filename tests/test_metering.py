"""Per-item memory figures (magcache_generate.metering) and the loader's host footprint."""

import time
from pathlib import Path

import torch

import wan
from magcache_generate.metering import HOST_SCOPE_ITEM, HostPressure, StageMeter, host_memory, reset_host_peak
from magcache_generate.progress import memory_rows
from wan.testing.dit import tiny_transformer_config, write_transformer_folder

CPU = torch.device("cpu")
MIB = 2**20


def vm_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_host_peak_is_per_item():
    meter = StageMeter(CPU)
    with meter.stage("denoise"):
        big = torch.ones(512 * MIB // 4)  # 512 MiB touched
        del big
    first = meter.peak_memory()
    second = StageMeter(CPU).peak_memory()  # a new item: the high-water mark starts again
    if first["host_rss_scope"] != HOST_SCOPE_ITEM:
        assert second["host_rss_gib"] >= first["host_rss_gib"]  # process lifetime: never lower
        return
    assert first["host_rss_gib"] - second["host_rss_gib"] > 0.3  # margin for the process's own churn
    assert meter.seconds["denoise"] > 0 and first["gpu_allocated_gib"] is None


def test_summary_rows_name_the_scope_and_every_stage():
    mem = {
        "host_rss_gib": 3.25,
        "host_rss_scope": HOST_SCOPE_ITEM,
        "gpu_allocated_gib": 7.0,
        "gpu_reserved_gib": 7.5,
        "stages": {
            "encode_text": {"gpu_allocated_gib": 1.0, "gpu_reserved_gib": 1.5},
            "denoise": {"gpu_allocated_gib": 7.0, "gpu_reserved_gib": 7.5},
        },
    }
    rows = dict(memory_rows(mem))
    assert rows["peak host RSS, this item (GiB)"] == "3.25"
    assert rows["GPU denoise: reserved / allocated (GiB)"] == "7.50 / 7.00"
    assert len(rows) == 3


def test_loading_keeps_one_copy_in_host_memory(tmp_path):
    """The memory-mapped load adds the converted model to the anonymous memory, nothing more: the mapped
    file pages are page cache, released tensor by tensor, so even the resident set stays well below
    the model plus the file."""
    cfg = tiny_transformer_config("t2v", dim=512, num_heads=4, ffn_dim=1024, num_layers=8)
    folder = write_transformer_folder(tmp_path / "m", cfg, seed=1, shards=2)
    file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # float32, ~100 MB
    if not reset_host_peak() or host_memory() is None:
        return
    before, anon_before = vm_kib("VmRSS"), host_memory()["anon"]
    model = wan.load_transformer(folder, dtype=torch.bfloat16)
    grown = (vm_kib("VmHWM") - before) * 1024
    anon_grown = host_memory()["anon"] - anon_before
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_bytes < file_bytes * 0.55
    # margins of half the file, so allocator and interpreter churn of tens of MiB cannot flip the verdict
    assert anon_grown < model_bytes + file_bytes // 4
    assert grown < model_bytes + file_bytes // 2


def test_host_pressure_counts_anonymous_memory_and_states_mapped_files_apart(tmp_path):
    import mmap

    if host_memory() is None:
        return
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(256 * MIB))
    base = host_memory()
    mapped_meter, allocating_meter = StageMeter(CPU), StageMeter(CPU)
    with (
        mapped_meter.stage("load"),
        path.open("rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
    ):
        assert sum(m[i] for i in range(0, len(m), mmap.PAGESIZE)) == 0  # fault every page in
    with allocating_meter.stage("denoise"):
        big = torch.ones(256 * MIB // 4)
        time.sleep(5 * HostPressure.INTERVAL_S)  # held long enough for the sampler to see it
        del big
    mapped_record, allocating_record = mapped_meter.peak_memory(), allocating_meter.peak_memory()
    base_gib, file_gib = (base["anon"] + base["pinned"]) / 2**30, base["file"] / 2**30
    assert mapped_record["host_file_backed_gib"] - file_gib >= 0.2  # the mapped file, stated apart
    assert mapped_record["host_pressure_gib"] - base_gib < 0.1  # and no pressure
    assert allocating_record["host_pressure_gib"] - base_gib >= 0.2  # the tensor is
    rows = dict(memory_rows(allocating_record))
    assert (
        rows["peak host memory, anonymous + pinned (GiB)"] == f"{allocating_record['host_pressure_gib']:.2f}"
    )
