"""The strict key and shape check of every weight file against the model it will be loaded into, before
anything loads.

The loaders run the same checks, but only when each model loads: a damaged low-noise expert or VAE
would otherwise be found after the text encoder, the high-noise phase or the whole denoise ran. Here
the models are built on the meta device (no memory, no data) from the tensor tables that
``checkpoint_check`` read, and wan's own loader checks compare them key by key. Imports torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from magcache_generate.checkpoint_check import CheckpointContents, check_fit, official_table
from wan.checkpoint_reader import ReadError, TensorTable, read_table_with_torch
from wan.errors import CheckpointError
from wan.loading import check_state_shapes as check_transformer_shapes
from wan.loading import config_from_checkpoint
from wan.modules.transformer import WanTransformer
from wan.text_encoder import check_state_shapes as check_text_encoder_shapes
from wan.text_encoder import config_from_shapes
from wan.vae import check_state_dict, vae_config_from_state_dict
from wan.weight_formats import t5_layout, vae_layout


def check_weights_fit_models(contents: CheckpointContents) -> None:
    """Raise ``wan.errors.CheckpointError`` (one line: file, key, fix) at the first tensor that is missing,
    unexpected or mis-shaped for its model. Reads no tensor data."""
    if contents.t5 is None or contents.vae is None:
        contents = dataclasses.replace(
            contents,
            t5=contents.t5
            if contents.t5 is not None
            else official_table(contents.t5_file, t5_layout, _table_via_torch(contents.t5_file)),
            vae=contents.vae
            if contents.vae is not None
            else official_table(contents.vae_file, vae_layout, _table_via_torch(contents.vae_file)),
        )
        check_fit(contents)
    t5_shapes = {key: info.shape for key, info in contents.t5.items()}
    check_text_encoder_shapes(t5_shapes, config_from_shapes(t5_shapes, contents.t5_file), contents.t5_file)

    source = f"VAE checkpoint {contents.vae_file}"
    meta_state = {key: torch.empty(info.shape, device="meta") for key, info in contents.vae.items()}
    vae_config = vae_config_from_state_dict(meta_state, source)
    with torch.device("meta"):
        vae = vae_config.build()
    check_state_dict(vae, meta_state, vae_config, source)

    for dit in contents.dits.values():
        shapes = {key: (info.shape, shard) for key, (info, shard) in dit.tensors.items()}
        config = config_from_checkpoint(dit.config, shapes, dit.folder)
        with torch.device("meta"):
            model = WanTransformer(config)
        check_transformer_shapes(model, shapes, dit.folder)


def _table_via_torch(path: Path) -> TensorTable:
    """The table of a .pth whose pickle the torch-free reader does not model, read with torch
    (weights_only, memory-mapped: no tensor data)."""
    try:
        return read_table_with_torch(path)
    except ReadError as err:
        raise CheckpointError(f"{path} {err}; download it again") from None
