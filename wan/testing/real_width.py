"""Random-weight checkpoint folders in the official layout at the REAL widths, for memory and speed
benchmarks on a GPU machine (a smaller `--small` variant for CPU dry runs).

DiT: the task's real width (A14B: dim 5120, 40 heads, ffn 13824; ti2v-5B: 3072, 24, 14336) with any
number of layers, bf16 shards, values drawn on `device` (fast on a GPU). VAE: real widths (2.1: 96;
2.2: 160/256). umT5: real width (4096, 64 heads, ffn 10240) but 2 layers and a 64-piece vocabulary.
With `share_experts` an A14B checkpoint stores one expert and links the other to it (same weights,
half the disk).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from wan.configs import TASKS
from wan.modules.transformer import TransformerConfig, WanTransformer
from wan.testing.dit import tiny_transformer_config, write_transformer_folder
from wan.testing.text import tiny_t5_state_dict, write_tiny_tokenizer
from wan.testing.vae import tiny_vae_state_dict

REAL_DIT = {"t2v": (5120, 40, 13824, 40), "i2v": (5120, 40, 13824, 40), "ti2v": (3072, 24, 14336, 30)}
SMALL_DIT = (64, 2, 128)
SHARD_BYTES = 5 * 10**9


def real_transformer_config(
    task: str, *, layers: int | None = None, small: bool = False
) -> TransformerConfig:
    """The task's DiT config at real width (full depth unless `layers`), or a narrow one (`small`)."""
    model_type = TASKS[task].model_type
    dim, heads, ffn, depth = REAL_DIT[model_type]
    if small:
        dim, heads, ffn = SMALL_DIT
    return tiny_transformer_config(
        model_type,
        dim=dim,
        ffn_dim=ffn,
        num_heads=heads,
        num_layers=layers or depth,
        text_len=512,
        text_dim=64 if small else 4096,
    )


def random_dit_state(
    cfg: TransformerConfig, device: str | torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """bf16 weights with unit-ish activations (as `wan.testing.dit`), drawn on `device`."""
    gen = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanTransformer(cfg).state_dict().items()}
    state = {}
    for key, shape in shapes.items():
        x = torch.randn(shape, generator=gen, device=device)
        if key.endswith("modulation"):
            x = x * 0.1
        elif key.endswith(".bias"):
            x = x * 0.02
        elif len(shape) == 1:
            x = 1.0 + x * 0.1
        else:
            x = x / math.sqrt(math.prod(shape[1:]))
        state[key] = x.to(torch.bfloat16).cpu().contiguous()
    return state


def write_real_width_checkpoint(
    root: str | Path,
    task: str,
    *,
    layers: int | None = None,
    device: str | torch.device = "cpu",
    small: bool = False,
    share_experts: bool = True,
    seed: int = 0,
) -> Path:
    """Write a complete checkpoint folder for `task` at `root` and return it."""
    spec = TASKS[task]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = real_transformer_config(task, layers=layers, small=small)
    folders = spec.dit_folders[:1] if share_experts else spec.dit_folders
    for i, folder in enumerate(folders):
        state = random_dit_state(cfg, device, seed + i)
        size = sum(v.numel() * v.element_size() for v in state.values())
        write_transformer_folder(
            root / folder, cfg, state=state, shards=max(1, math.ceil(size / SHARD_BYTES))
        )
        del state
    if share_experts and len(spec.dit_folders) == 2:
        link = root / spec.dit_folders[1]
        if not link.exists():
            link.symlink_to(spec.dit_folders[0])
    t5_dim = 64 if small else 4096
    t5 = tiny_t5_state_dict(
        vocab_size=64,
        dim=t5_dim,
        dim_attn=t5_dim,
        dim_ffn=128 if small else 10240,
        num_heads=4 if small else 64,
        num_layers=2,
        dtype=torch.bfloat16,
    )
    torch.save(t5, root / spec.t5_checkpoint)
    if spec.vae_kind == "2.1":
        vae = tiny_vae_state_dict("2.1", dim=8 if small else 96)
    else:
        vae = tiny_vae_state_dict("2.2", dim=8 if small else 160, dec_dim=8 if small else 256)
    torch.save(vae, root / spec.vae_checkpoint)
    write_tiny_tokenizer(root / spec.t5_tokenizer, vocab_size=64)
    return root
