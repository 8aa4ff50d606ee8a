"""Where each part of a task's weights comes from: the official folder (``--ckpt-dir``) or one flag per part.

``--dit`` (ti2v-5B) or ``--dit-high`` / ``--dit-low`` (A14B), ``--t5``, ``--vae`` and ``--tokenizer`` each
replace that part of ``--ckpt-dir``; with every part given, ``--ckpt-dir`` may be left out. A ``--t5`` file
that embeds its tokenizer (ComfyUI's umT5 files) stands in for a missing tokenizer folder. Torch-free:
this only decides paths and checks that they exist; what the files hold is checked from their headers
by ``checkpoint_check``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from magcache_generate.request import UserError
from wan.configs import TaskConfig

CKPT_DIR = "--ckpt-dir"
DIT_FLAGS = {"": "--dit", "high_noise_model": "--dit-high", "low_noise_model": "--dit-low"}
PART_FLAGS = {"t5": "--t5", "vae": "--vae", "tokenizer": "--tokenizer"}


@dataclass(frozen=True)
class WeightPaths:
    """The files (or folders) a run loads, and the flag that named each (for error messages)."""

    dits: dict[str, Path]  # the task's DiT folder name ("" / high_noise_model / low_noise_model) -> path
    t5: Path
    vae: Path
    tokenizer: Path
    root: Path | None = None  # --ckpt-dir, when given
    flags: dict[str, str] = field(default_factory=dict)  # "dit:<folder>", "t5", "vae", "tokenizer" -> flag

    def flag(self, part: str) -> str:
        return self.flags.get(part, CKPT_DIR)

    @cached_property
    def dit_fp8(self) -> str | None:
        """The scale granularity ("tensor" / "row") when every DiT of the run stores its block Linears
        in float8 (they then load as fp8 Linears, as with ``--quantize fp8``), else None. From the
        headers only; a file that cannot be read says None here (its own check names the problem)."""
        from wan.checkpoint_layout import locate_transformer_files, read_tensor_table
        from wan.errors import CheckpointError
        from wan.weight_formats import FormatError, dit_layout_of_shards

        found = set()
        for path in self.dits.values():
            try:
                layout, _ = dit_layout_of_shards(read_tensor_table(locate_transformer_files(path)))
            except (CheckpointError, FormatError, OSError):
                return None
            found.add(layout.block_fp8)
        if None in found or not found:
            return None
        return "row" if "row" in found else "tensor"

    @classmethod
    def official(cls, root: Path, cfg: TaskConfig) -> WeightPaths:
        """Every part where the official release keeps it under ``root``."""
        root = Path(root)
        return cls(
            dits={folder: root / folder if folder else root for folder in cfg.dit_folders},
            t5=root / cfg.t5_checkpoint,
            vae=root / cfg.vae_checkpoint,
            tokenizer=root / cfg.t5_tokenizer,
            root=root,
        )


@dataclass(frozen=True)
class PartOptions:
    """The per-part flags as given (None: not given)."""

    dit: Path | None = None
    dit_high: Path | None = None
    dit_low: Path | None = None
    t5: Path | None = None
    vae: Path | None = None
    tokenizer: Path | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in vars(self).values())


def resolve_weight_paths(ckpt_dir: Path | None, parts: PartOptions, cfg: TaskConfig) -> WeightPaths:
    """Each part from its flag, else from ``ckpt_dir``; a UserError when a part has no source, a flag does
    not fit the task, or a named path does not exist."""
    if cfg.two_experts and parts.dit is not None:
        raise UserError(
            f"--dit is for ti2v-5B; {cfg.name} has two experts: pass --dit-high FILE and --dit-low FILE"
        )
    if not cfg.two_experts and (parts.dit_high is not None or parts.dit_low is not None):
        flag = "--dit-high" if parts.dit_high is not None else "--dit-low"
        raise UserError(f"{flag} is for the A14B tasks; {cfg.name} has one transformer: pass --dit FILE")
    given: dict[str, Path | None] = {
        "dit:": parts.dit,
        "dit:high_noise_model": parts.dit_high,
        "dit:low_noise_model": parts.dit_low,
        "t5": parts.t5,
        "vae": parts.vae,
        "tokenizer": parts.tokenizer,
    }
    flags = {**{f"dit:{folder}": flag for folder, flag in DIT_FLAGS.items()}, **PART_FLAGS}
    needed = [f"dit:{folder}" for folder in cfg.dit_folders] + ["t5", "vae", "tokenizer"]
    official_tokenizer = Path(ckpt_dir) / cfg.t5_tokenizer if ckpt_dir is not None else None
    no_folder = parts.tokenizer is None and not (official_tokenizer and official_tokenizer.is_dir())
    if no_folder and parts.t5 is not None and embeds_tokenizer(Path(parts.t5)):
        given["tokenizer"] = Path(parts.t5)
        flags["tokenizer"] = f"{PART_FLAGS['t5']} (its embedded tokenizer)"
    if ckpt_dir is None:
        missing = [flags[p] for p in needed if given[p] is None]
        if missing:
            what = " ".join(f"{m} ..." for m in missing)
            raise UserError(
                f"--ckpt-dir is required: the folder with the {cfg.name} weights; or give every part "
                f"({what} missing); or --demo for tiny random ones"
            )
        official = None
    else:
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            what = "is a file, not a folder" if ckpt_dir.exists() else "not found"
            hint = (
                "; for a single transformer file use --dit/--dit-high/--dit-low" if ckpt_dir.is_file() else ""
            )
            raise UserError(
                f"--ckpt-dir '{ckpt_dir}' {what}; pass the folder with the {cfg.name} weights{hint}"
            )
        official = WeightPaths.official(ckpt_dir, cfg)
    chosen: dict[str, Path] = {}
    used_flags: dict[str, str] = {}
    for part in needed:
        path = given[part]
        if path is None:
            assert official is not None
            chosen[part] = _official_part(official, part)
            continue
        path = Path(path)
        kind_ok = (path.is_dir() or embeds_tokenizer(path)) if part == "tokenizer" else path.exists()
        if not kind_ok:
            if part == "tokenizer":
                what = (
                    "is a file without an embedded tokenizer; pass the tokenizer folder (google/umt5-xxl)"
                    if path.exists()
                    else "not found"
                )
            else:
                what = "not found; check the path"
            raise UserError(f"{flags[part]} '{path}' {what}")
        if part in ("t5", "vae") and path.is_dir():
            raise UserError(f"{flags[part]} '{path}' is a folder; pass the {part.upper()} weights file")
        chosen[part] = path
        used_flags[part] = flags[part]
    return WeightPaths(
        dits={folder: chosen[f"dit:{folder}"] for folder in cfg.dit_folders},
        t5=chosen["t5"],
        vae=chosen["vae"],
        tokenizer=chosen["tokenizer"],
        root=ckpt_dir,
        flags=used_flags,
    )


def embeds_tokenizer(path: Path) -> bool:
    """Whether ``path`` is a umT5 file carrying its sentencepiece model (a ``spiece_model`` tensor), from
    its header. A file that cannot be read says False here: its own check names the problem."""
    from wan.checkpoint_reader import ReadError, read_table
    from wan.weight_formats import TOKENIZER_KEY

    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        return TOKENIZER_KEY in read_table(path)
    except (ReadError, OSError):
        return False


def _official_part(official: WeightPaths, part: str) -> Path:
    if part.startswith("dit:"):
        return official.dits[part[len("dit:") :]]
    return getattr(official, part)
