"""The benchmark checkpoint factory (wan.testing.real_width) writes complete official-layout folders."""

import torch

from magcache_generate.preflight import check_checkpoint_dir
from wan.configs import TASKS
from wan.loading import read_transformer_config
from wan.testing.real_width import real_transformer_config, write_real_width_checkpoint


def test_real_widths_and_small_dry_run_checkpoint(tmp_path):
    assert (
        real_transformer_config("t2v-A14B").dim == 5120
        and real_transformer_config("t2v-A14B").num_layers == 40
    )
    assert (
        real_transformer_config("ti2v-5B").ffn_dim == 14336
        and real_transformer_config("i2v-A14B").in_dim == 36
    )
    root = write_real_width_checkpoint(tmp_path / "ckpt", "t2v-A14B", layers=3, small=True)
    assert check_checkpoint_dir(root, TASKS["t2v-A14B"]).root == root
    high = read_transformer_config(root / "high_noise_model")
    assert high == read_transformer_config(root / "low_noise_model")  # one expert, linked
    assert (high.dim, high.num_layers, high.text_dim) == (64, 3, 64)
    assert (root / "low_noise_model").is_symlink()
    state = torch.load(root / "Wan2.1_VAE.pth", weights_only=True)
    assert state["decoder.conv1.weight"].dtype == torch.float32
