"""``magcache-generate convert SRC OUT.safetensors --to fp8|bf16|fp16 [--lora FILE[:SCALE]] [--overwrite]``.

One DiT (an official expert folder such as ``Wan2.2-T2V-A14B/high_noise_model``, a ti2v-5B folder, or any
single file the loader reads) becomes one safetensors file in the Comfy-Org layout (``wan.conversion``),
with LoRAs baked in. Everything is checked from headers before any tensor is read (one ``error:`` line,
exit 2, nothing written); the file is written to a hidden temp file, its header read back and checked
entry by entry, then renamed onto OUT, so an interrupted or failed conversion leaves no OUT behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from magcache_generate.atomic import OutputExistsError, OutputPathError, atomic_write_file, check_writable
from magcache_generate.loras import parse_lora_arg
from magcache_generate.request import UserError
from wan.checkpoint_layout import TransformerFiles, locate_transformer_files, read_tensor_table
from wan.checkpoint_reader import ReadError, identify, read_safetensors_header
from wan.errors import CheckpointError
from wan.weight_formats import FormatError, Layout, dit_kind, dit_layout_of_shards

TARGETS = ("fp8", "bf16", "fp16")
EXPERT_FOLDERS = ("high_noise_model", "low_noise_model")


@dataclass(frozen=True)
class Source:
    files: TransformerFiles
    layout: Layout
    shards: dict[str, Path]


def check_source(src: Path) -> Source:
    """The DiT at ``src``, from headers; a UserError naming SRC and the fix otherwise."""
    if not src.exists():
        raise UserError(f"SRC '{src}' not found; give a transformer folder or a .safetensors file")
    if src.is_dir() and all((src / name).is_dir() for name in EXPERT_FOLDERS):
        raise UserError(
            f"SRC '{src}' holds two experts; convert one at a time: '{src / EXPERT_FOLDERS[0]}' or "
            f"'{src / EXPERT_FOLDERS[1]}'"
        )
    try:
        files = locate_transformer_files(src)
        layout, shards = dit_layout_of_shards(read_tensor_table(files))
    except (CheckpointError, FormatError) as err:
        raise UserError(f"SRC {err}" if isinstance(err, CheckpointError) else f"SRC '{src}' {err}") from None
    if dit_kind(layout.shapes) is None:
        what = identify(layout.shapes) or "no Wan model this program knows"
        raise UserError(f"SRC '{src}' is not a Wan diffusion transformer (it holds {what}); give a DiT")
    try:
        check_complete(files, layout, shards, src)
    except CheckpointError as err:
        raise UserError(f"SRC {err}") from None
    return Source(files, layout, shards)


def check_complete(files: TransformerFiles, layout: Layout, shards: dict[str, Path], src: Path) -> None:
    """Every tensor of the architecture the shapes describe, and no other (the loader's strict check)."""
    import torch

    from wan.loading import check_state_shapes, read_transformer_config
    from wan.modules.transformer import WanTransformer

    with torch.device("meta"):
        model = WanTransformer(read_transformer_config(src))
    shapes = {key: (info.shape, shards[key]) for key, info in layout.sources.items()}
    check_state_shapes(model, shapes, src)


def check_output(out: Path, src: Path, overwrite: bool) -> Path:
    if out.suffix != ".safetensors":
        raise UserError(f"OUT '{out}' must end in .safetensors; e.g. {out.with_suffix('.safetensors').name}")
    if out.exists() and src.exists() and out.resolve() in {p.resolve() for p in _source_paths(src)}:
        raise UserError(f"OUT '{out}' is the source itself; write the conversion to a new file")
    try:
        return check_writable(out, overwrite)
    except OutputExistsError:
        raise UserError(f"OUT '{out}' already exists; pass --overwrite to replace it") from None
    except OutputPathError as err:
        raise UserError(str(err)) from None


def _source_paths(src: Path) -> list[Path]:
    return [src] if src.is_file() else [p for p in src.iterdir() if p.is_file()]


def convert(
    src: Annotated[
        Path, typer.Argument(help="One DiT: an official expert folder, a ti2v-5B folder or a single file.")
    ],
    out: Annotated[Path, typer.Argument(help="The .safetensors file to write (Comfy-Org layout).")],
    to: Annotated[str, typer.Option("--to", help="fp8 (block Linears fp8, the rest fp16), bf16 or fp16.")],
    lora: Annotated[
        list[str] | None,
        typer.Option("--lora", help="FILE[:SCALE]: a LoRA baked into the weights (repeatable)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert one DiT to one safetensors file in the Comfy-Org layout, LoRAs baked in."""
    if to not in TARGETS:
        raise UserError(f"--to {to!r} is not one of fp8, bf16, fp16; e.g. --to fp8")
    out = check_output(out, src, overwrite)
    source = check_source(src)
    specs = _lora_specs(lora or [], src)
    from wan.conversion import plan_conversion
    from wan.safetensors_writer import file_size

    plan = plan_conversion(source.layout, source.shards, source.files, to)
    metadata = {"format": "pt", "converted_to": to}
    if specs:
        metadata["loras"] = ", ".join(f"{s.path.name}:{s.scale:g}" for s in specs)
    size = file_size(plan.entries, metadata)
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if free < size:
        raise UserError(
            f"OUT '{out}' needs {size / 2**30:.1f} GiB but its disk has {free / 2**30:.1f} GiB free"
        )
    _write(src, source, plan, specs, out, metadata, overwrite)
    typer.echo(f"wrote {out} ({_size(size)}, {to}{', LoRAs baked in' if specs else ''})", err=True)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _lora_specs(values: list[str], src: Path) -> list:
    from wan.lora import LoraError, LoraSpec, check_loras

    specs = []
    for value in values:
        path, scale = parse_lora_arg(value, "--lora")
        if not path.is_file():
            raise UserError(f"--lora '{path}' not found; give a LoRA .safetensors file")
        specs.append(LoraSpec(path, scale))
    try:
        check_loras(src, specs, where=f"the transformer in {src}")
    except LoraError as err:
        raise UserError(str(err)) from None
    return specs


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute().parent
    while not path.exists():
        path = path.parent
    return path


def _write(
    src: Path, source: Source, plan, specs: list, out: Path, metadata: dict[str, str], overwrite: bool
) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    from wan.conversion import write_conversion
    from wan.lora import build_merge

    merge = build_merge(src, specs)  # the LoRA update of each tensor, in float32 (wan.lora.LoraMerge)
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )

    def write(temp: Path) -> None:
        with progress:
            task = progress.add_task(f"converting to {plan.target}", total=plan.nbytes)
            with temp.open("wb") as file:
                write_conversion(
                    file,
                    source.files,
                    source.layout,
                    source.shards,
                    plan,
                    transform=merge,
                    metadata=metadata,
                    on_bytes=lambda n: progress.advance(task, n),
                )
        if merge is not None:
            merge.finish()
        check_written(temp, plan)

    atomic_write_file(out, write, overwrite=overwrite)


def check_written(path: Path, plan) -> None:
    """Read the written header back and check every entry's name, dtype and shape, and the file's size."""
    try:
        table = read_safetensors_header(path)  # also checks every byte range against the file's size
    except ReadError as err:
        raise CheckpointError(f"the written file {err}; nothing was saved") from None
    expected = {e.name: (str(e.dtype).removeprefix("torch."), e.shape) for e in plan.entries}
    written = {name: (info.dtype, info.shape) for name, info in table.items()}
    if written != expected:
        wrong = sorted(set(written.items()) ^ set(expected.items()))
        raise CheckpointError(
            f"the written header differs from the plan at {wrong[0][0]!r}; nothing was saved"
        )


def command():
    """The click command ``cli.main`` runs for ``magcache-generate convert ...``."""
    app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
    app.command()(convert)
    return typer.main.get_command(app)
