"""Complete tiny checkpoint folders in the official Wan 2.2 layout (random weights).

    Wan2.2-T2V-A14B/                       Wan2.2-TI2V-5B/
      high_noise_model/ low_noise_model/     config.json + diffusion_pytorch_model-*.safetensors + index
      models_t5_umt5-xxl-enc-bf16.pth        models_t5_umt5-xxl-enc-bf16.pth
      Wan2.1_VAE.pth                         Wan2.2_VAE.pth
      google/umt5-xxl/                       google/umt5-xxl/

The .pth files are `torch.save`d plain state dicts with the official key names, the T5 one in bf16,
as the released files. They go through exactly the loaders real checkpoints use.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wan.configs import TASKS
from wan.testing.dit import tiny_transformer_config, write_transformer_folder
from wan.testing.text import tiny_t5_state_dict, write_tiny_tokenizer
from wan.testing.vae import tiny_vae_state_dict

T5_DIM = 32
TOKENIZER_VOCAB = 64


def write_tiny_checkpoint(
    root: str | Path,
    task: str,
    *,
    seed: int = 0,
    dim: int = 32,
    num_layers: int = 2,
    text_len: int = 32,
    vae_dim: int = 4,
) -> Path:
    """Write a random tiny checkpoint folder for `task` at `root` and return it."""
    cfg = TASKS[task]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dit = tiny_transformer_config(
        cfg.model_type, dim=dim, num_layers=num_layers, ffn_dim=2 * dim, text_len=text_len, text_dim=T5_DIM
    )
    for i, folder in enumerate(cfg.dit_folders):
        write_transformer_folder(root / folder, dit, seed=seed + i, shards=2)
    t5 = tiny_t5_state_dict(vocab_size=TOKENIZER_VOCAB, dim=T5_DIM, seed=seed, dtype=torch.bfloat16)
    torch.save(t5, root / cfg.t5_checkpoint)
    vae = tiny_vae_state_dict(cfg.vae_kind, dim=vae_dim, seed=seed)
    torch.save(vae, root / cfg.vae_checkpoint)
    write_tiny_tokenizer(root / cfg.t5_tokenizer, vocab_size=TOKENIZER_VOCAB)
    return root
