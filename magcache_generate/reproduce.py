"""Reproducible videos: the generation settings travel inside the mp4 (one JSON object in its `comment`
metadata tag) and in the sidecar (`settings`), and `--settings-from FILE` (such an mp4, or its sidecar)
runs them again.

The settings use the command's option names (`GenerateOptions` fields), so that reading them back is a
`dataclasses.replace`. On the command line of a re-run, an option whose value differs from its default
overrides the file's (e.g. `--settings-from old.mp4 --base-seed 3`). LoRAs are recorded with their
sha256; a re-run refuses a LoRA file whose content changed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magcache_generate import __version__
from magcache_generate.request import Request, UserError

if TYPE_CHECKING:
    from magcache_generate.options import GenerateOptions

FORMAT = "magcache-generate settings 1"
EXPERT_FLAG = {"all": "lora", "high": "lora_high", "low": "lora_low"}
# The settings a file may carry, as GenerateOptions fields.
FIELDS = (
    "task",
    "prompt",
    "negative_prompt",
    "base_seed",
    "size",
    "frame_num",
    "sample_solver",
    "sample_steps",
    "sample_shift",
    "sample_guide_scale",
    "use_magcache",
    "magcache_mode",
    "magcache_thresh",
    "magcache_k",
    "retention_ratio",
    "magcache_speedup",
    "magcache_ratios",
    "distilled",
)


def generation_settings(request: Request) -> dict[str, Any]:
    """What made this video, as option values (`--settings-from` reads them back)."""
    from magcache_generate.loras import file_sha256

    mc = request.magcache
    low, high = request.guide_scale
    return {
        "format": FORMAT,
        "version": __version__,
        "task": request.task,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,  # None: the official one
        "base_seed": request.base_seed,
        "size": request.size,
        "frame_num": request.frame_num,
        "sample_solver": request.sample_solver,
        "sample_steps": request.sample_steps,
        "sample_shift": request.sample_shift,
        "sample_guide_scale": f"{low:g},{high:g}",
        "use_magcache": mc.enabled,
        "magcache_mode": mc.mode if mc.enabled else None,
        "magcache_thresh": mc.thresh,
        "magcache_k": mc.K,
        "retention_ratio": mc.retention_ratio,
        "magcache_speedup": mc.speedup,
        "magcache_ratios": str(mc.ratios_file.resolve()) if mc.ratios_file else None,
        "distilled": request.distilled,
        "loras": [
            {
                "path": str(c.path.resolve()),
                "sha256": file_sha256(c.path),
                "scale": c.scale,
                "expert": c.expert,
            }
            for c in request.loras
        ],
    }


def settings_comment(request: Request) -> str:
    """The settings as the one-line JSON written into the mp4's `comment` tag."""
    return json.dumps(generation_settings(request), ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------
# Reading them back


def read_settings(path: Path) -> dict[str, Any]:
    """The settings stored in an mp4 made here (its comment tag) or in its JSON sidecar."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"--settings-from '{path}' not found; give a video made by this tool or its .json sidecar"
        )
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"--settings-from '{path}' is not a JSON file ({err})") from None
        settings = data.get("settings") if isinstance(data, dict) else None
    else:
        settings = _json_or_none(_comment_of(path))
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise UserError(
            f"--settings-from '{path}' carries no generation settings; give a video made by this tool "
            "or its .json sidecar"
        )
    return settings


def _json_or_none(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _comment_of(video: Path) -> str | None:
    """The `comment` tag of a video, read with the bundled ffmpeg (no ffprobe needed)."""
    import imageio_ffmpeg

    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(video), "-f", "ffmetadata", "-"]
    done = subprocess.run(command, capture_output=True, timeout=60)
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(
            f"--settings-from '{video}' is not a readable video ({reason[-1] if reason else 'ffmpeg failed'})"
        )
    return ffmetadata_value(done.stdout.decode("utf-8", errors="replace"), "comment")


def ffmetadata_value(text: str, key: str) -> str | None:
    """A global key's value in ffmpeg's ffmetadata text ('=', ';', '#', '\\' and newlines are escaped
    with a backslash; an escaped newline continues the value)."""
    out: list[str] = []
    lines = iter(text.split("\n"))
    for line in lines:
        if line.startswith("["):  # a [STREAM] or [CHAPTER] section: past the global tags
            return None
        if not line.startswith(f"{key}="):
            continue
        value = line[len(key) + 1 :]
        while True:
            i, chars = 0, []
            continued = False
            while i < len(value):
                if value[i] == "\\":
                    if i + 1 < len(value):
                        chars.append(value[i + 1])
                        i += 2
                        continue
                    continued = True  # a backslash ending the line: an escaped newline
                    break
                chars.append(value[i])
                i += 1
            out.append("".join(chars))
            if not continued:
                return "".join(out)
            out.append("\n")
            value = next(lines, "")
    return None


def apply_settings(options: GenerateOptions, settings: dict[str, Any]) -> GenerateOptions:
    """`options` with the file's settings wherever the command line left an option at its default."""
    from magcache_generate.loras import file_sha256

    defaults = {f.name: f.default for f in dataclasses.fields(options)}
    changes: dict[str, Any] = {}
    for name in FIELDS:
        if name in settings and getattr(options, name) == defaults[name]:
            value = settings[name]
            changes[name] = Path(value) if name == "magcache_ratios" and value is not None else value
    given_loras = any(
        getattr(options, f) not in (None, ()) for f in ("lora", "lora_high", "lora_low", "lora_dir")
    )
    if not given_loras and settings.get("loras"):
        lists: dict[str, list[str]] = {"lora": [], "lora_high": [], "lora_low": []}
        for lora in settings["loras"]:
            path = Path(lora["path"])
            if not path.is_file():
                raise UserError(
                    f"--settings-from: LoRA '{path}' is missing; put it back or pass --lora yourself"
                )
            if file_sha256(path) != lora["sha256"]:
                raise UserError(
                    f"--settings-from: LoRA '{path}' changed since the video was made (sha256 differs); "
                    "restore it or pass --lora yourself"
                )
            lists[EXPERT_FLAG[lora["expert"]]].append(f"{path}:{lora['scale']}")
        changes.update({k: tuple(v) for k, v in lists.items() if v})
    if changes.get("magcache_mode") is None:
        changes.pop("magcache_mode", None)
    return dataclasses.replace(options, **changes)


def sidecar_extras(request: Request, started_at: str, total_s: float) -> dict[str, Any]:
    """What the sidecar adds to the mp4's settings: when and how long, and absolute paths."""

    def absolute(path: Path | None) -> str | None:
        return None if path is None else str(Path(path).resolve())

    files = request.weight_paths
    parts = {"t5": files.t5, "vae": files.vae, "tokenizer": files.tokenizer}
    parts.update({f"dit:{folder}": path for folder, path in files.dits.items()})
    given = {files.flag(part): absolute(path) for part, path in parts.items() if part in files.flags}
    return {
        "settings": generation_settings(request),
        "started_at": started_at,
        "total_s": round(total_s, 3),
        "paths": {
            "video": absolute(request.save_file),
            "sidecar": absolute(request.sidecar_file),
            "ckpt_dir": absolute(files.root),
            "weight_files": given,  # the parts given by --dit/--dit-high/--dit-low/--t5/--vae/--tokenizer
            "image": absolute(request.image),
            "save_frames": absolute(request.save_frames),
        },
    }
