"""LoRAs for the Wan transformer: key styles, mapping to the official parameter names, strict checks
against a checkpoint's headers, and the float32 merge applied to each tensor as it loads.

Key styles (recognised per key; prefixes ``diffusion_model.``, ``model.diffusion_model.``,
``transformer.``, ``base_model.model.``, ``lora_unet_`` or none):

* official / diffusers-PEFT: ``<module>.lora_A.weight`` + ``<module>.lora_B.weight`` (optional ``.alpha``);
* kohya / ComfyUI: ``<module>.lora_down.weight`` + ``<module>.lora_up.weight`` + ``<module>.alpha``,
  with ``<module>`` official (``blocks.0.self_attn.q``) or flattened (``lora_unet_blocks_0_self_attn_q``);
* full differences: ``<module>.diff`` (added to ``<module>.weight``, or to the parameter itself, e.g.
  ``blocks.0.modulation``) and ``<module>.diff_b`` (added to ``<module>.bias``);
* diffusers module names (``blocks.0.attn1.to_q``, ``ffn.net.0.proj``, ``proj_out``, ...), when the file
  uses them, are mapped to the official ones.

Merge: ``W' = W + sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i`` (``alpha = rank`` when absent),
``W' = W + scale * diff`` for differences, in float32; the loader then casts to the run dtype, so a
LoRA costs nothing per step (as the Lightning fork, which merges into the float32 model before its
bf16 downcast). Checking needs only the safetensors headers (no torch); merging imports torch.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from wan.checkpoint_layout import locate_transformer_files, read_tensor_table
from wan.checkpoint_reader import (
    FLOAT_DTYPES,
    MappedSafetensors,
    ReadError,
    TensorInfo,
    read_safetensors_header,
    read_scalar,
)
from wan.errors import CheckpointError
from wan.weight_formats import FormatError, dit_layout_of_shards

if TYPE_CHECKING:
    import torch

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "lora_unet_")
ROLE_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
UNSUPPORTED = (".lora_mid.", ".hada_", ".lokr_", ".dora_scale", ".lora_magnitude_vector")
DIFFUSERS_MARKERS = ("attn1.", "attn2.", "ffn.net.", "condition_embedder.", "proj_out", "scale_shift_table")
DIFFUSERS_RENAMES = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"\.attn1\.to_out\.0$", ".self_attn.o"),
        (r"\.attn2\.to_out\.0$", ".cross_attn.o"),
        (r"\.attn1\.(?:to_)?(q|k|v|norm_q|norm_k)$", r".self_attn.\1"),
        (r"\.attn2\.(?:to_)?(q|k|v|norm_q|norm_k)$", r".cross_attn.\1"),
        (r"\.ffn\.net\.0\.proj$", ".ffn.0"),
        (r"\.ffn\.net\.2$", ".ffn.2"),
        (r"^(blocks\.\d+)\.norm2$", r"\1.norm3"),  # diffusers' affine cross-attention norm
        (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
        (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
        (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
        (r"^condition_embedder\.time_proj$", "time_projection.1"),
        (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
        (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
        (r"^proj_out$", "head.head"),
        (r"^scale_shift_table$", "head.modulation"),
    )
)
SHOWN_KEYS = 3


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied; one line naming the file and the first offending keys."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"LoRA '{path}' {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and its strength (the user's scale; 0 leaves the weights untouched)."""

    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class LoraPatch:
    """One update of one parameter from one file: low-rank (keys = down, up) or a difference (keys = diff)."""

    param: str
    kind: str  # "lowrank" | "diff"
    keys: tuple[str, ...]
    factor: float  # scale * alpha / rank (low-rank), scale (difference)
    rank: int | None = None


@dataclass(frozen=True)
class LoraFile:
    """A LoRA checked against one transformer checkpoint: what it changes there."""

    path: Path
    scale: float
    patches: tuple[LoraPatch, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({p.rank for p in self.patches if p.rank is not None}))


# ---------------------------------------------------------------------------------------------------
# Checking (torch-free: headers and alpha scalars only)


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a transformer checkpoint (folder or file), from the shard headers."""
    files = locate_transformer_files(path)
    try:  # official names: a single file's prefix stripped
        layout, _ = dit_layout_of_shards(read_tensor_table(files))
    except FormatError as err:
        raise CheckpointError(f"{files.shards[0]} {err}") from None
    return layout.shapes


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def _split_role(key: str) -> tuple[str, str | None]:
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return key, None


def _strip_prefix(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


@dataclass
class _Resolver:
    """Official module/parameter names of a checkpoint, and the aliases LoRA files use for them."""

    shapes: Mapping[str, tuple[int, ...]]
    diffusers: bool
    names: set[str] = field(init=False)
    flat: dict[str, str | None] = field(init=False)

    def __post_init__(self) -> None:
        modules = {k.rpartition(".")[0] for k in self.shapes if "." in k}
        self.names = modules | set(self.shapes)
        self.flat = {}
        for name in sorted(self.names):
            alias = name.replace(".", "_")
            self.flat[alias] = None if alias in self.flat and self.flat[alias] != name else name

    def module(self, raw: str) -> str | None:
        name = _strip_prefix(raw)
        if name in self.names:
            return name
        if self.diffusers:
            for pattern, repl in DIFFUSERS_RENAMES:
                renamed = pattern.sub(repl, name)
                if renamed != name and renamed in self.names:
                    return renamed
        return self.flat.get(name) if "." not in name else None

    def target(self, module: str, role: str) -> str | None:
        if role == "diff_b":
            candidates = [f"{module}.bias"]
        elif role == "diff":
            candidates = [f"{module}.weight", module]
        else:
            candidates = [f"{module}.weight"]
        return next((c for c in candidates if c in self.shapes), None)


def _fail(path: Path, problem: str, keys: Sequence[str]) -> None:
    if keys:
        raise LoraError(path, f"{problem}: {_listing(keys)}")


def check_lora(spec: LoraSpec, shapes: Mapping[str, tuple[int, ...]], where: str) -> LoraFile:
    """Map every key of the LoRA file to a parameter in ``shapes`` and check ranks, shapes and alphas.

    ``where`` names the model in messages (e.g. "the high-noise transformer"). Raises LoraError.
    """
    path = Path(spec.path)
    if not path.is_file():
        raise LoraError(path, "not found" if not path.exists() else "is not a file; pass a .safetensors file")
    if not math.isfinite(spec.scale):
        raise LoraError(path, f"has scale {spec.scale}; use a finite number")
    try:
        header = read_safetensors_header(path)
    except ReadError as err:
        raise LoraError(path, f"is not a safetensors LoRA file ({err})") from None
    keys = list(header)
    unsupported = [k for k in keys if any(m in k for m in UNSUPPORTED)]
    _fail(path, "uses a LoRA variant that is not supported (LoCon mid / LoHa / LoKr / DoRA)", unsupported)
    roles = {k: _split_role(k) for k in keys}
    if not any(role for _, role in roles.values()):
        shown = f"; its keys look like {_listing(keys)}" if keys else "; it holds no tensors"
        raise LoraError(
            path,
            f"is not a LoRA: no lora_down/lora_up, lora_A/lora_B or diff tensors{shown} (a full checkpoint?)",
        )
    _fail(path, "has keys that are not LoRA tensors", [k for k, (_, role) in roles.items() if role is None])

    resolver = _Resolver(shapes, diffusers=any(m in k for k in keys for m in DIFFUSERS_MARKERS))
    # (param, "lowrank" | "diff" | "diff_b") -> role -> key
    groups: dict[tuple[str, str], dict[str, str]] = {}
    unmatched, duplicated = [], []
    for key, (raw, role) in roles.items():
        module = resolver.module(raw)
        target = resolver.target(module, role) if module is not None else None
        if target is None:
            unmatched.append(key)
            continue
        kind = "lowrank" if role in ("down", "up", "alpha") else role
        slot = groups.setdefault((target, kind), {})
        if role in slot:
            duplicated.append(key)
        slot[role] = key
    _fail(path, "updates one parameter twice (two key styles for the same layer?)", duplicated)
    incomplete = [
        next(iter(slot.values()))
        for (_, kind), slot in groups.items()
        if kind == "lowrank" and not {"down", "up"} <= set(slot)
    ]
    _fail(path, "has LoRA layers without their lora_down/lora_A or lora_up/lora_B partner", incomplete)
    not_float = [
        k
        for slot in groups.values()
        for r, k in slot.items()
        if r != "alpha" and header[k].dtype not in FLOAT_DTYPES
    ]
    _fail(path, "has tensors that are not floating point", not_float)

    patches, bad_rank, bad_shape = [], [], []
    for (param, kind), slot in sorted(groups.items()):
        want = tuple(shapes[param])
        if kind != "lowrank":
            key = slot[kind]
            if header[key].shape != want and math.prod(header[key].shape) != math.prod(want):
                bad_shape.append(f"{key} {list(header[key].shape)} vs {param} {list(want)}")
            patches.append(LoraPatch(param, "diff", (key,), spec.scale))
            continue
        down, up = header[slot["down"]], header[slot["up"]]
        rank = down.shape[0] if down.shape else 0
        if len(up.shape) < 2 or up.shape[1] != rank:
            bad_rank.append(f"{slot['down']} {list(down.shape)} / {slot['up']} {list(up.shape)}")
            continue
        if not _fits(down, up, want):
            bad_shape.append(
                f"{slot['down']} {list(down.shape)}, {slot['up']} {list(up.shape)} vs {param} {list(want)}"
            )
            continue
        factor = (
            spec.scale * (_alpha(path, header, slot.get("alpha")) / rank) if "alpha" in slot else spec.scale
        )
        patches.append(LoraPatch(param, "lowrank", (slot["down"], slot["up"]), factor, rank))
    _fail(path, "has lora_down/lora_up pairs whose ranks differ", bad_rank)
    _fail(
        path,
        f"does not fit {where}{_width(shapes)}: shapes differ (a LoRA for another model width?)",
        bad_shape,
    )
    # after the shape check: a LoRA for a deeper model of another width reports the width first
    _fail(path, f"has keys that match no parameter of {where} (a LoRA for another model?)", unmatched)
    return LoraFile(path, spec.scale, tuple(patches))


def _fits(down: TensorInfo, up: TensorInfo, weight: tuple[int, ...]) -> bool:
    """down [r, in, *kernel] and up [out, r, 1, ...] against a Linear [out, in] or a Conv [out, in, *kernel]."""
    return (
        len(down.shape) == len(weight)
        and len(up.shape) == len(weight)
        and tuple(down.shape[1:]) == weight[1:]
        and up.shape[0] == weight[0]
        and all(d == 1 for d in up.shape[2:])
    )


def _alpha(path: Path, header: Mapping[str, TensorInfo], key: str) -> float:
    try:
        value = read_scalar(path, header[key])
    except ReadError as err:
        raise LoraError(path, f"has an unreadable alpha {key} ({err})") from None
    if not math.isfinite(value):
        raise LoraError(path, f"has a non-finite alpha {key} = {value}")
    return value


def _width(shapes: Mapping[str, tuple[int, ...]]) -> str:
    embed = shapes.get("patch_embedding.weight")
    return f" (dim {embed[0]})" if embed else ""


def check_loras(
    checkpoint: str | Path, specs: Iterable[LoraSpec], *, where: str | None = None
) -> list[LoraFile]:
    """Check every LoRA against one transformer checkpoint (headers only); raises LoraError."""
    specs = list(specs)
    if not specs:
        return []
    shapes = checkpoint_shapes(checkpoint)
    label = where or f"the transformer in {checkpoint}"
    return [check_lora(spec, shapes, label) for spec in specs]


def expert_label(expert: str) -> str:
    """How messages name an expert's transformer: "the high-noise transformer", "the transformer"."""
    return f"the {expert}-noise transformer" if expert in ("high", "low") else "the transformer"


# ---------------------------------------------------------------------------------------------------
# Merging


class LoraMerge:
    """The per-tensor load transform ``(key, tensor) -> tensor``: adds the LoRA updates in float32.

    Parameters no LoRA touches pass through unchanged (and uncopied). The update is computed on
    ``device`` (the run device: a rank-64 A14B LoRA is about 1.8 TFLOP per expert) and the merged
    float32 tensor is returned there; the loader converts and places it afterwards. LoRAs with
    scale 0 are skipped. ``finish()`` checks that every patched parameter went through.
    """

    def __init__(self, files: Sequence[LoraFile], device: torch.device | str | None = None):
        self.files = tuple(files)
        self.patches: dict[str, list[tuple[Path, LoraPatch]]] = {}
        for f in self.files:
            if f.scale == 0:
                continue
            for p in f.patches:
                self.patches.setdefault(p.param, []).append((f.path, p))
        self.device = device or "cpu"
        self._handles: dict[Path, MappedSafetensors] = {}
        self._lock = threading.Lock()
        self._merged: set[str] = set()

    def __call__(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        patches = self.patches.get(key)
        if not patches:
            return tensor
        import torch

        merged = tensor.to(device=self.device, dtype=torch.float32)
        for path, patch in patches:
            merged = merged + self.delta(path, patch, merged.shape)
        self._merged.add(key)
        return merged

    def merge_quantized(
        self, key: str, weight: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same merge into a weight held quantised (fp8 + float32 scale, `wan.fp8`): dequantised,
        merged in float32, requantised at its scale's granularity. Untouched weights pass through."""
        patches = self.patches.get(key)
        if not patches:
            return weight, scale
        from wan.fp8 import merge_delta

        weight, scale = weight.to(self.device), scale.to(self.device)
        delta = self.delta(*patches[0], weight.shape)
        for path, patch in patches[1:]:
            delta = delta + self.delta(path, patch, weight.shape)
        self._merged.add(key)
        return merge_delta(weight, scale, delta)

    def delta(self, path: Path, patch: LoraPatch, shape: torch.Size) -> torch.Tensor:
        """The float32 update of one patch, shaped like its parameter."""
        import torch

        def read(key: str) -> torch.Tensor:
            return self._open(path).tensor(key).to(device=self.device, dtype=torch.float32)

        if patch.kind == "diff":
            return patch.factor * read(patch.keys[0]).reshape(shape)
        down, up = (read(k) for k in patch.keys)
        return (patch.factor * torch.matmul(up.flatten(1), down.flatten(1))).reshape(shape)

    def _open(self, path: Path) -> MappedSafetensors:
        with self._lock:  # the loader calls the transform from several threads
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = MappedSafetensors(path)
            return handle

    def finish(self) -> None:
        """Release the LoRA files; raise if a patched parameter never reached the transform."""
        self._handles.clear()
        missed = sorted(set(self.patches) - self._merged)
        if missed:
            path = self.patches[missed[0]][0][0]
            raise LoraError(path, f"was not merged into {_listing(missed)}: the loader skipped them")


def build_merge(
    checkpoint: str | Path,
    specs: Iterable[LoraSpec],
    *,
    device: torch.device | str | None = None,
    where: str | None = None,
) -> LoraMerge | None:
    """The load transform merging ``specs`` into ``checkpoint`` (checked first), or None without LoRAs."""
    files = check_loras(checkpoint, specs, where=where)
    return LoraMerge(files, device=device) if files else None
