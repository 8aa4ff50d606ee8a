"""Checks of what a run touches, before any weight is loaded: the input image, the checkpoint folder
(every file present and its tensor table read, no tensor data), the outputs (a temporary file is
created and removed where each goes) and the device. Only ``check_device`` imports torch: run it
after the others."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from magcache_generate.atomic import check_writable
from magcache_generate.checkpoint_check import CheckpointContents, inspect_weights
from magcache_generate.request import Request, UserError
from magcache_generate.weight_paths import CKPT_DIR, PartOptions, WeightPaths, resolve_weight_paths
from wan.configs import TaskConfig

TOKENIZER_VOCAB_FILES = ("tokenizer.json", "spiece.model")  # as wan.tokenizer.VOCAB_FILES (torch-free here)


def check_image(image: Path | None, cfg: TaskConfig) -> Path | None:
    """Image presence per task (required / optional / refused) and that the file decodes as an image."""
    if image is None:
        if cfg.image == "required":
            raise UserError(f"{cfg.name} needs an input image; pass --image first_frame.jpg")
        return None
    if cfg.image == "refused":
        raise UserError(f"{cfg.name} takes no --image; drop it, or use --task i2v-A14B or ti2v-5B")
    image = Path(image)
    if not image.is_file():
        what = "is a folder, not an image file" if image.is_dir() else "not found"
        raise UserError(f"--image '{image}' {what}; check the path")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as opened:
            opened.verify()  # reads the headers and checks integrity without decoding the pixels
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"--image '{image}' is not a readable image ({reason}); pass a PNG or JPEG file"
        ) from None
    return image


def check_before_loading(weights: WeightPaths, cfg: TaskConfig, device: str) -> WeightPaths:
    """The checks that read the checkpoint files and the machine, cheapest first: every weight file's
    header or pickle (torch-free), then the device, then every tensor against its model built on the
    meta device (both import torch). Nothing is loaded; returns the weight paths."""
    contents = inspect_checkpoint(weights, cfg)
    check_device(device)
    from magcache_generate.model_check import check_weights_fit_models

    check_weights_fit_models(contents)
    return contents.weights


GENERIC_LAYOUT_HINT = "; is this the right folder (e.g. high_noise_model/)?"  # wan.checkpoint_layout's


def layout_hint(ckpt_dir: Path, cfg: TaskConfig) -> str:
    """When the folder holds the other model family's layout, say so and name the task that fits it."""
    two_expert_layout = (ckpt_dir / "high_noise_model").is_dir() or (ckpt_dir / "low_noise_model").is_dir()
    if not cfg.two_experts and two_expert_layout:
        return (
            f"; this is an A14B folder (high_noise_model/, low_noise_model/): {cfg.name} needs the "
            "Wan2.2-TI2V-5B folder (config.json and the weights at its top), or use --task t2v-A14B / i2v-A14B"
        )
    if cfg.two_experts and not two_expert_layout and (ckpt_dir / "config.json").is_file():
        return (
            f"; this folder has one transformer at its top (the ti2v-5B layout): {cfg.name} needs "
            "high_noise_model/ and low_noise_model/ (e.g. ./Wan2.2-T2V-A14B), or use --task ti2v-5B"
        )
    return ""


def check_checkpoint_dir(
    ckpt_dir: Path | None, cfg: TaskConfig, parts: PartOptions | None = None
) -> WeightPaths:
    """``inspect_checkpoint`` of ``--ckpt-dir`` and the per-part flags, for callers that only need the paths."""
    return inspect_checkpoint(resolve_weight_paths(ckpt_dir, parts or PartOptions(), cfg), cfg).weights


def inspect_checkpoint(weights: WeightPaths | Path | None, cfg: TaskConfig) -> CheckpointContents:
    """Every file the task loads is present (DiT folder(s) or files, umT5 encoder, VAE, tokenizer) and holds
    what the task needs, read from headers and pickles only. ``weights``: the resolved paths, or an
    official checkpoint folder."""
    from wan.checkpoint_layout import locate_transformer_files  # torch-free
    from wan.errors import CheckpointError

    if not isinstance(weights, WeightPaths):
        weights = resolve_weight_paths(weights, PartOptions(), cfg)

    root = weights.root
    incomplete = f"checkpoint '{root}' is incomplete for {cfg.name}"
    dit_files = {}
    for folder in cfg.dit_folders:
        flag = weights.flag(f"dit:{folder}")
        try:
            dit_files[folder] = locate_transformer_files(weights.dits[folder])
        except CheckpointError as err:
            if flag == CKPT_DIR:  # the folder may hold the other model family's layout: say so
                hint = layout_hint(root, cfg) if root is not None else ""
                message = str(err).replace(GENERIC_LAYOUT_HINT, "") if hint else str(err)
                raise UserError(f"{incomplete}: {message.rstrip('; ')}{hint}") from None
            raise UserError(f"{flag}: {err}") from None
    for part, path, name, what in (
        ("t5", weights.t5, cfg.t5_checkpoint, "umT5 text encoder"),
        ("vae", weights.vae, cfg.vae_checkpoint, "VAE"),
    ):
        if not path.is_file() and weights.flag(part) == CKPT_DIR:
            raise UserError(
                f"{incomplete}: {name} (the {what}) is missing; download it into that folder, or pass "
                f"the file as --{part}"
            )
    tokenizer = weights.tokenizer
    embedded = tokenizer.is_file()  # a --t5 / --tokenizer file with its sentencepiece model (weight_paths)
    if not embedded and not any((tokenizer / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        if weights.flag("tokenizer") == CKPT_DIR:
            raise UserError(
                f"{incomplete}: tokenizer folder {cfg.t5_tokenizer}/ with tokenizer.json or spiece.model is "
                "missing; download it, or pass the folder as --tokenizer"
            )
        raise UserError(
            f"--tokenizer '{tokenizer}' has no tokenizer.json or spiece.model; pass the google/umt5-xxl "
            "tokenizer folder"
        )
    return inspect_weights(weights, cfg, dit_files)


def check_outputs(request: Request) -> None:
    """The video, its JSON sidecar, the frames folder and the calibration file can all be written: the
    paths are valid and free (or --overwrite), and a file can really be created where each will go."""
    from magcache_generate.atomic import OutputExistsError, OutputPathError
    from magcache_generate.naming import FRAME_NAME_PATTERN, video_suffix_problem

    problem = video_suffix_problem(request.save_file)
    if problem:
        raise UserError(f"--save-file {problem}")
    if (
        request.magcache.calibrate_file is not None
        and request.sidecar
        and (request.magcache.calibrate_file.resolve() == request.sidecar_file.resolve())
    ):
        raise UserError(
            f"--magcache-calibrate '{request.magcache.calibrate_file}' is the video's sidecar file; choose another name"
        )
    checks = [(request.save_file, False, None)]
    if request.sidecar:
        checks.append((request.sidecar_file, False, None))
    if request.save_frames is not None:
        checks.append((request.save_frames, True, FRAME_NAME_PATTERN))
    if request.magcache.calibrate_file is not None:
        checks.append((request.magcache.calibrate_file, False, None))
    if request.dense_save_file is not None:
        checks.append((request.dense_save_file, False, None))
    for path, folder, replaceable in checks:
        try:
            check_writable(path, request.overwrite, folder=folder, replaceable=replaceable)
        except (OutputExistsError, OutputPathError) as err:
            raise UserError(str(err)) from None
    for path in dict.fromkeys(_nearest_existing_folder(p) for p, _, _ in checks):
        check_can_create_files(path)


def _nearest_existing_folder(output: Path) -> Path:
    folder = Path(output).absolute().parent
    while not folder.exists():
        folder = folder.parent
    return folder


def check_can_create_files(folder: Path) -> None:
    """Create and remove a hidden temporary file in ``folder``: permission bits say little (root, network
    and read-only file systems, /proc), so try it."""
    try:
        handle, name = tempfile.mkstemp(prefix=".magcache-write-check-", dir=folder)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"cannot create files in '{folder}' ({reason}); choose another output location"
        ) from None
    os.close(handle)
    os.unlink(name)


def check_device(name: str) -> None:
    """``--device`` names a device this machine has. Imports torch, so it runs after the cheap checks."""
    if name in ("auto", "cpu"):
        return
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why, fix = "this PyTorch build has no CUDA support", "install a CUDA build of PyTorch"
        else:
            why, fix = "no CUDA device is visible", "check the driver and CUDA_VISIBLE_DEVICES"
        raise UserError(f"--device {name}: {why}; {fix}, or pass --device cpu")
    count = torch.cuda.device_count()
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise UserError(
            f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; pick one of them"
        )
