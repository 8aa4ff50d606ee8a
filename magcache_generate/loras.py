"""`--lora`, `--lora-high`, `--lora-low` and `--lora-dir`: from command-line values to per-expert LoRA
choices, their check against the checkpoint's headers (before any weight loads) and their sidecar
records. Torch-free: the merge itself happens in `wan.lora`, inside the loader.

`--lora-dir DIR` is the Lightning fork's layout (its `wan/configs/*`): `DIR/high_noise_model.safetensors`
and `DIR/low_noise_model.safetensors` for the A14B tasks, `DIR/diffusion_pytorch_model.safetensors` for
ti2v-5B. It may be repeated (the fork's `--lora_dir2`).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

from magcache_generate.request import LoraChoice, UserError
from magcache_generate.weight_paths import WeightPaths
from wan.configs import TaskConfig
from wan.errors import CheckpointError

LORA_DIR_FILES = {
    "high": "high_noise_model.safetensors",
    "low": "low_noise_model.safetensors",
    "single": "diffusion_pytorch_model.safetensors",
}
FORM = "use FILE or FILE:SCALE, e.g. style.safetensors:0.8"


def experts_of(cfg: TaskConfig) -> tuple[str, ...]:
    return ("high", "low") if cfg.two_experts else ("single",)


def parse_lora_arg(text: str, flag: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE``; a name that exists as a file is taken whole (it may contain ':')."""
    if ":" not in text or Path(text).exists():
        return Path(text), 1.0
    name, _, scale_text = text.rpartition(":")
    try:
        scale = float(scale_text)
    except ValueError:
        raise UserError(f"{flag} '{text}': scale '{scale_text}' is not a number; {FORM}") from None
    if not math.isfinite(scale):
        raise UserError(f"{flag} '{text}': scale {scale_text} is not a finite number; {FORM}")
    if not name:
        raise UserError(f"{flag} '{text}' names no file; {FORM}")
    return Path(name), scale


def resolve_loras(
    cfg: TaskConfig,
    lora: Sequence[str] | None = (),
    lora_high: Sequence[str] | None = (),
    lora_low: Sequence[str] | None = (),
    lora_dir: Sequence[str | Path] | None = (),
) -> tuple[LoraChoice, ...]:
    """Every LoRA with its expert and scale; files must exist. Order: --lora-dir, --lora, --lora-high, --lora-low."""
    choices: list[LoraChoice] = []
    for folder in lora_dir or ():
        choices += _lora_dir(Path(folder), cfg)
    for flag, values, expert in (
        ("--lora", lora, "all"),
        ("--lora-high", lora_high, "high"),
        ("--lora-low", lora_low, "low"),
    ):
        for text in values or ():
            if expert != "all" and not cfg.two_experts:
                raise UserError(
                    f"{flag} applies to the {expert}-noise expert of the A14B tasks; {cfg.name} has one model: "
                    "use --lora FILE[:SCALE]"
                )
            path, scale = parse_lora_arg(str(text), flag)
            _check_file(path, flag)
            choices.append(LoraChoice(path, scale, expert, flag))
    return tuple(choices)


def _lora_dir(folder: Path, cfg: TaskConfig) -> list[LoraChoice]:
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise UserError(f"--lora-dir '{folder}' {what}; pass the folder holding the LoRA files")
    experts = experts_of(cfg)
    names = [LORA_DIR_FILES[e] for e in experts]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"--lora-dir '{folder}' has no {missing[0]}; for {cfg.name} it holds {' and '.join(names)} "
            "(the Lightning fork's layout)"
        )
    return [
        LoraChoice(folder / LORA_DIR_FILES[e], 1.0, "all" if e == "single" else e, "--lora-dir")
        for e in experts
    ]


def _check_file(path: Path, flag: str) -> None:
    if not path.is_file():
        what = (
            "is a folder; pass the .safetensors file (or use --lora-dir)"
            if path.is_dir()
            else "not found; pass the path of a LoRA .safetensors file"
        )
        raise UserError(f"{flag} '{path}' {what}")


def expert_specs(loras: Sequence[LoraChoice], experts: Sequence[str]) -> dict:
    """expert -> [wan.lora.LoraSpec] in command-line order (what `wan.experts.ExpertPool` takes)."""
    from wan.lora import LoraSpec

    return {e: [LoraSpec(c.path, c.scale) for c in loras if c.applies_to(e)] for e in experts}


def check_loras(loras: Sequence[LoraChoice], weights: WeightPaths, cfg: TaskConfig) -> None:
    """Check every LoRA against the headers of the expert(s) it goes into; one UserError line if one fails."""
    if not loras:
        return
    from wan.lora import LoraError, LoraSpec, check_lora, checkpoint_shapes, expert_label

    folders = dict(zip(experts_of(cfg), cfg.dit_folders, strict=True))
    for expert, folder in folders.items():
        chosen = [c for c in loras if c.applies_to(expert)]
        if not chosen:
            continue
        try:
            shapes = checkpoint_shapes(weights.dits[folder])
        except CheckpointError as err:
            raise UserError(f"{weights.flag(f'dit:{folder}')} '{weights.dits[folder]}': {err}") from None
        for choice in chosen:
            try:
                check_lora(LoraSpec(choice.path, choice.scale), shapes, expert_label(expert))
            except LoraError as err:
                raise UserError(f"{choice.flag}: {err}") from None


def lora_records(loras: Sequence[LoraChoice], cfg: TaskConfig) -> list[dict]:
    """The sidecar's record of each LoRA: path, sha256 of the file, scale, the expert(s) it went into."""
    return [
        {
            "path": str(c.path.resolve()),
            "sha256": file_sha256(c.path),
            "scale": c.scale,
            "experts": [e for e in experts_of(cfg) if c.applies_to(e)],
            "flag": c.flag,
        }
        for c in loras
    ]


def file_sha256(path: Path) -> str:
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime key the cache
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**22):
            digest.update(chunk)
    return digest.hexdigest()
