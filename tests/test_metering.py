"""Per-item memory figures (magcache_generate.metering) and the loader's host footprint."""

from pathlib import Path

import torch

import wan
from magcache_generate.metering import HOST_SCOPE_ITEM, StageMeter, reset_host_peak
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
    """No memory map: the peak is the converted model plus one tensor, not the file on top of it."""
    cfg = tiny_transformer_config("t2v", dim=512, num_heads=4, ffn_dim=1024, num_layers=8)
    folder = write_transformer_folder(tmp_path / "m", cfg, seed=1, shards=2)
    file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # float32, ~100 MB
    if not reset_host_peak():
        return
    before = vm_kib("VmRSS")
    model = wan.load_transformer(folder, dtype=torch.bfloat16)
    grown = (vm_kib("VmHWM") - before) * 1024
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_bytes < file_bytes * 0.55
    # A mapped file would add about file_bytes on top of the model; plain reads add one tensor at a time.
    # The bound sits halfway, so allocator and interpreter churn of tens of MiB cannot flip the verdict.
    assert grown < model_bytes + file_bytes // 2
