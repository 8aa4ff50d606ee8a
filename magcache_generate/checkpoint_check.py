"""Does a checkpoint folder hold what the task needs? Torch-free; reads headers and pickles, no tensor data.

Every DiT shard, the umT5 file and the VAE file are opened and their tensor tables read
(``wan.checkpoint_reader``); then each file must hold the right model (not the T5 under the VAE's name),
the VAE must be the task's generation, and the parts must fit together: the DiT's input channels are
the task's (t2v 16, i2v 36, ti2v 48: the I2V and T2V folders look alike otherwise), its text width is
the T5's and its output channels are the VAE's latent channels. Each failure is one ``UserError``
line naming the file and the fix. The strict per-key check against the models runs later, with torch
(``model_check``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from magcache_generate.request import UserError
from magcache_generate.weight_paths import CKPT_DIR, WeightPaths
from wan.checkpoint_layout import TransformerFiles, dit_dims, read_tensor_table
from wan.checkpoint_reader import (
    T5_MARKER_KEYS,
    VAE_MARKER_KEYS,
    ReadError,
    TensorInfo,
    TensorTable,
    UnsupportedPickle,
    identify,
    read_table,
    vae_kind,
)
from wan.configs import TaskConfig
from wan.errors import CheckpointError
from wan.weight_formats import FormatError, dit_layout_of_shards, t5_layout, vae_layout

RELEASES = {
    "t2v-A14B": "Wan-AI/Wan2.2-T2V-A14B",
    "i2v-A14B": "Wan-AI/Wan2.2-I2V-A14B",
    "ti2v-5B": "Wan-AI/Wan2.2-TI2V-5B",
}
DIT_IN_CHANNELS = {"t2v": 16, "i2v": 36, "ti2v": 48}  # patch_embedding input channels per model type
VAE_LATENT_CHANNELS = {"2.1": 16, "2.2": 48}


@dataclass(frozen=True)
class DitContents:
    """One transformer folder or file: its tensors under official names (with the shard holding each),
    its config.json (if any) and the flag that named it."""

    folder: Path
    tensors: dict[str, tuple[TensorInfo, Path]]
    config: dict
    flag: str = CKPT_DIR


@dataclass(frozen=True)
class CheckpointContents:
    """Tensor tables of every weight file of a task's checkpoint folder. A ``.pth`` table is None when its
    pickle uses a torch global the torch-free reader does not model: ``model_check`` reads it with torch
    (memory-mapped, no tensor data) and runs ``check_fit`` then."""

    weights: WeightPaths
    task: TaskConfig
    dits: dict[str, DitContents]  # "" (root) or high_noise_model / low_noise_model
    t5_file: Path
    t5: TensorTable | None
    vae_file: Path
    vae: TensorTable | None

    @property
    def root(self) -> Path | None:
        """The official folder (--ckpt-dir), when one was given."""
        return self.weights.root


def inspect_weights(
    weights: WeightPaths, cfg: TaskConfig, dit_files: dict[str, TransformerFiles]
) -> CheckpointContents:
    """Read every weight file's tensor table, under official names (``wan.weight_formats``: single-file
    layouts mapped), and check it against the task (``dit_files``: the located transformer files per
    DiT folder)."""
    release = RELEASES.get(cfg.name, "the official release")
    dits = {
        folder: _read_dit(
            weights.dits[folder],
            files,
            fix_for(weights.flag(f"dit:{folder}"), release),
            weights.flag(f"dit:{folder}"),
        )
        for folder, files in dit_files.items()
    }
    t5_file, vae_file = weights.t5, weights.vae
    t5 = _probe(t5_file, "umT5 text encoder", fix_for(weights.flag("t5"), release))
    vae = _probe(vae_file, "VAE", fix_for(weights.flag("vae"), release))
    t5 = None if t5 is None else official_table(t5_file, t5_layout, t5)
    vae = None if vae is None else official_table(vae_file, vae_layout, vae)
    contents = CheckpointContents(weights, cfg, dits, t5_file, t5, vae_file, vae)
    if t5 is not None and vae is not None:
        check_fit(contents)
    return contents


def check_fit(contents: CheckpointContents) -> None:
    """Each file holds the model the task needs, and the DiT, T5 and VAE fit together."""
    release = RELEASES.get(contents.task.name, "the official release")
    _check_t5(contents, release)
    _check_vae(contents, release)
    for dit in contents.dits.values():
        _check_dit(dit, contents, release)


def fix_for(flag: str, release: str) -> str:
    """How to replace a damaged file: from the release, or (a part given by its own flag) a good copy."""
    if flag == CKPT_DIR:
        return f"download it again from {release}"
    return f"download it again, or pass another file as {flag}"


def official_table(path: Path, layout_of, table: TensorTable) -> TensorTable:
    """A file's tensor table under official names (prefix stripped, Hugging Face T5 names mapped, markers
    and scales set aside): what every later check compares against the models."""
    try:
        layout = layout_of(table)
    except FormatError as err:
        raise UserError(f"'{path}' {err}; convert it to bf16 or fp16, or use the official file") from None
    return {key: TensorInfo(src.dtype, src.shape) for key, src in layout.sources.items()}


def _probe(path: Path, what: str, fix: str) -> TensorTable | None:
    try:
        return read_table(path)
    except UnsupportedPickle:
        return None  # left to torch.load(weights_only=True) in model_check
    except ReadError as err:
        raise UserError(f"'{path}' (the {what}) {err}; {fix}") from None


def _read_dit(folder: Path, files: TransformerFiles, fix: str, flag: str = CKPT_DIR) -> DitContents:
    try:
        tables = read_tensor_table(files, fix=fix)
        layout, shards = dit_layout_of_shards(tables)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    except FormatError as err:
        raise UserError(f"'{files.shards[0]}' {err}; convert it to bf16 or fp16, or {fix}") from None
    tensors = {key: (TensorInfo(src.dtype, src.shape), shards[key]) for key, src in layout.sources.items()}
    config: dict = {}
    if files.config is not None:
        try:
            config = json.loads(files.config.read_text())
        except ValueError:
            raise UserError(f"'{files.config}' is not valid JSON; {fix}") from None
        if not isinstance(config, dict):
            raise UserError(f"'{files.config}' is not a transformer config; {fix}")
    return DitContents(folder, tensors, config, flag)


def _check_t5(contents: CheckpointContents, release: str) -> None:
    missing = [k for k in T5_MARKER_KEYS if k not in contents.t5]
    if missing:
        found = identify(contents.t5)
        what = f"holds {found}" if found else f"has no tensor {missing[0]!r}"
        if contents.weights.flag("t5") == CKPT_DIR:
            fix = f"put {contents.task.t5_checkpoint} from {release} there"
        else:
            fix = "pass the umT5-XXL encoder file as --t5 (models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors)"
        raise UserError(f"'{contents.t5_file}' {what}, not the umT5 text encoder; {fix}")


def _check_vae(contents: CheckpointContents, release: str) -> None:
    cfg, vae = contents.task, contents.vae
    needed = f"the Wan{cfg.vae_kind} VAE ({cfg.vae_checkpoint} from {release})"
    if contents.weights.flag("vae") != CKPT_DIR:
        comfy = "wan2.2_vae.safetensors" if cfg.vae_kind == "2.2" else "wan_2.1_vae.safetensors"
        needed = f"the Wan{cfg.vae_kind} VAE as --vae ({cfg.vae_checkpoint} or {comfy})"
    missing = [k for k in VAE_MARKER_KEYS if k not in vae]
    if missing:
        found = identify(vae)
        what = f"holds {found}" if found else f"has no tensor {missing[0]!r}"
        raise UserError(f"'{contents.vae_file}' {what}, not a VAE; {cfg.name} needs {needed}")
    kind = vae_kind(vae)
    if kind != cfg.vae_kind:
        raise UserError(f"'{contents.vae_file}' holds a Wan{kind} VAE, but {cfg.name} needs {needed}")
    z_dim = vae["conv2.weight"].shape[0] if vae["conv2.weight"].shape else 0
    if z_dim != VAE_LATENT_CHANNELS[kind]:
        raise UserError(
            f"'{contents.vae_file}' has {z_dim} latent channels, not the Wan{kind} VAE's "
            f"{VAE_LATENT_CHANNELS[kind]}; {cfg.name} needs {needed}"
        )


def _check_dit(dit: DitContents, contents: CheckpointContents, release: str) -> None:
    cfg = contents.task
    where = f"'{dit.folder}'"
    if dit.flag == CKPT_DIR:
        fix = f"pass the {release} folder as --ckpt-dir"
    else:
        fix = f"pass a {cfg.name} transformer file as {dit.flag}"
    tables = {key: info for key, (info, _) in dit.tensors.items()}
    for key in ("patch_embedding.weight", "text_embedding.0.weight", "head.head.weight"):
        if key not in tables:
            found = identify(tables)
            what = f"holds {found}" if found else f"has no tensor {key!r}"
            raise UserError(f"{where} {what}, not a Wan transformer; {fix}")
    try:
        dims = dit_dims({key: info.shape for key, info in tables.items()}, where)
    except CheckpointError as err:
        raise UserError(str(err)) from None  # the message says the fix
    in_dim, expected = dims.in_dim, DIT_IN_CHANNELS[cfg.model_type]
    if in_dim != expected:
        kinds = [t for t, n in DIT_IN_CHANNELS.items() if n == in_dim]
        what = (
            f"{'an' if kinds[0].startswith('i') else 'a'} {kinds[0]} transformer"
            if kinds
            else "a transformer"
        )
        raise UserError(
            f"{where} holds {what} ({in_dim} input channels), but {cfg.name} needs the {cfg.model_type} "
            f"one ({expected}); {fix} (or the matching --task)"
        )
    text_dim, t5_dim = dims.text_dim, contents.t5["token_embedding.weight"].shape[-1]
    if text_dim != t5_dim:
        raise UserError(
            f"{where} takes text features of width {text_dim} but '{contents.t5_file}' gives {t5_dim}; "
            f"the files come from different models, download them again from {release}"
        )
    z_dim = contents.vae["conv2.weight"].shape[0]
    if dims.out_dim != z_dim:
        raise UserError(
            f"{where} predicts {dims.out_dim} latent channels but '{contents.vae_file}' has {z_dim}; "
            f"{cfg.name} needs {cfg.vae_checkpoint} from {release}"
        )
