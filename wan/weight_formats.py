"""The single-file weight formats users already have, as pure functions over tensor tables.

A tensor table is ``name -> info`` where ``info`` has ``.dtype`` (as ``wan.checkpoint_reader`` names
it: "float16", "float8_e4m3fn"; safetensors' "F8_E4M3" is understood too) and ``.shape``; nothing
here reads tensor data or imports torch, so the CLI can check a file before anything loads. Each ``*_layout`` function turns a file's table into a
``Layout``: for every official Wan key, the file key that holds it and, for float8 weights, the key
of its scale. ``wan.weight_files`` then reads tensors through that layout.

Formats recognised (key names as the publishing projects' own readers use them):

* DiT: bare Wan keys or keys under ``model.diffusion_model.``; float32 / bf16 / fp16; float8_e4m3fn
  Linear weights with a per-tensor (0-d) or per-row (``[out]`` / ``[out, 1]``) scale named
  ``<layer>.scale_weight`` (older files) or ``<layer>.weight_scale`` (newer), activation scales
  ``scale_input`` / ``input_scale``, per-layer ``comfy_quant`` descriptors and the ``scaled_fp8``
  marker (the last three are not needed to dequantise, so they are ignored); float8 without any
  scale (the values are the weights). A scale beside a weight that is not float8 is a leftover:
  the weight's dtype decides.
* umT5: the official Wan names or Hugging Face T5 names (``shared.weight``,
  ``encoder.block.N.layer.0.SelfAttention.q.weight``, ..., ``encoder.final_layer_norm.weight``),
  optionally with the sentencepiece model embedded as the byte tensor ``spiece_model``.
* VAE: Wan key names in ``.pth`` or ``.safetensors``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

DIT_PREFIXES = ("model.diffusion_model.",)
FLOAT8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2"})
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # older / newer ComfyUI spelling
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")  # not needed to dequantise
MARKERS = frozenset({"scaled_fp8"})  # empty (or 2-element) marker tensor of scaled fp8 files
TOKENIZER_KEY = "spiece_model"  # umT5 files of ComfyUI embed the sentencepiece model as bytes
# The DiT block Linears' weights (official names): what a float8 file keeps in float8 in memory, and
# what ``--quantize fp8`` quantises (``wan.weight_storage``, ``wan.modules.fp8_linear.BLOCK_LINEARS``).
BLOCK_LINEAR_WEIGHTS = re.compile(r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])\.weight")
KEPT_FLOAT8 = "float8_e4m3fn"  # the float8 format the fp8 Linears hold (e5m2 files are dequantised)

# umT5: Wan name (after ``blocks.N.``) -> Hugging Face name (after ``encoder.block.N.``).
T5_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
T5_TOP_KEYS = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
# transformers' encoder-only files also store the tied copy of ``shared``
T5_HF_DUPLICATES = frozenset({"encoder.embed_tokens.weight"})
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")
_HF_TO_WAN_BLOCK = {hf: wan for wan, hf in T5_BLOCK_KEYS.items()}
_HF_TO_WAN_TOP = {hf: wan for wan, hf in T5_TOP_KEYS.items()}


P = TypeVar("P")


class FormatError(ValueError):
    """The file's tensors do not form a layout this reader knows; the message reads after the file name."""


class TensorInfoLike(Protocol):
    @property
    def dtype(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class WeightSource:
    """Where one official tensor lives in a file. ``scale`` is set only for a float8 weight that
    has a scale; the reader then hands the (float8 weight, scale) pair to the dequantiser."""

    key: str  # the key in the file
    dtype: str
    shape: tuple[int, ...]
    scale: str | None = None
    start: int | None = None  # byte offset in a safetensors file (reading in file order)
    scale_shape: tuple[int, ...] | None = None  # the scale's shape, when ``scale`` is set

    @property
    def float8(self) -> bool:
        return self.dtype in FLOAT8_DTYPES


@dataclass(frozen=True)
class Layout:
    """A file's tensors under their official names."""

    sources: dict[str, WeightSource]  # official key -> where it is in the file
    prefix: str = ""  # stripped from every key
    hf_names: bool = False  # umT5 under Hugging Face names
    ignored: tuple[str, ...] = ()  # file keys recognised and not loaded (markers, input scales, ...)
    tokenizer_key: str | None = None  # the embedded sentencepiece model, if any
    scale_keys: tuple[str, ...] = field(default=())  # file keys of the weight scales used

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: src.shape for key, src in self.sources.items()}

    @property
    def identity(self) -> bool:
        """The file already is the official layout: keys as the model's, nothing to dequantise."""
        return (
            not self.prefix
            and not self.hf_names
            and not self.ignored
            and not self.scale_keys
            and all(k == s.key for k, s in self.sources.items())
        )

    @property
    def float8(self) -> bool:
        return any(src.float8 for src in self.sources.values())

    @property
    def block_fp8(self) -> str | None:
        """The scale granularity ("tensor" or "row") when every DiT block Linear weight is stored
        float8_e4m3fn, so the model keeps them as fp8 Linears, bytes as stored; None otherwise (then
        float8 tensors are dequantised). "row" when any of them has per-row scales (a per-tensor scale
        then reads as the same value on every row); a weight without a scale has scale 1."""
        blocks = [src for key, src in self.sources.items() if BLOCK_LINEAR_WEIGHTS.fullmatch(key)]
        if not blocks or any(src.dtype not in (KEPT_FLOAT8, "F8_E4M3") for src in blocks):
            return None
        per_row = any(src.scale_shape is not None and math.prod(src.scale_shape) > 1 for src in blocks)
        return "row" if per_row else "tensor"

    def describe(self) -> str:
        """A few words for logs: 'fp8 (scaled), prefix model.diffusion_model.'."""
        parts = []
        if self.float8:
            parts.append("fp8 (scaled)" if self.scale_keys else "fp8 (unscaled)")
        dtypes = sorted({s.dtype for s in self.sources.values() if not s.float8})
        parts.append("/".join(dtypes))
        if self.prefix:
            parts.append(f"prefix {self.prefix}")
        if self.hf_names:
            parts.append("Hugging Face names")
        return ", ".join(parts)


def key_prefix(names: list[str] | tuple[str, ...]) -> str:
    """The known prefix every tensor key (markers aside) carries, or ''."""
    keys = [k for k in names if k not in MARKERS]
    for prefix in DIT_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def wan_t5_key(hf_name: str) -> str | None:
    """The official Wan umT5 name of a Hugging Face T5 encoder key, or None if it is not one."""
    if hf_name in _HF_TO_WAN_TOP:
        return _HF_TO_WAN_TOP[hf_name]
    match = _HF_BLOCK.fullmatch(hf_name)
    if match is None or match.group(2) not in _HF_TO_WAN_BLOCK:
        return None
    return f"blocks.{match.group(1)}.{_HF_TO_WAN_BLOCK[match.group(2)]}"


def _is_auxiliary(key: str) -> bool:
    return key in MARKERS or key.endswith(IGNORED_SUFFIXES) or key.endswith(WEIGHT_SCALE_SUFFIXES)


def pair_scales(table: dict[str, TensorInfoLike], rename: dict[str, str]) -> Layout:
    """Pair each float8 weight with its scale. ``rename``: file key -> official key of every tensor to load.

    Scales must be per tensor (one element) or per row (``[out]`` or ``[out, 1]``); anything else is a
    format this reader does not know (block-wise scales), refused rather than misread."""
    sources: dict[str, WeightSource] = {}
    used_scales: list[str] = []
    for file_key, official in rename.items():
        info = table[file_key]
        scale = None
        if info.dtype in FLOAT8_DTYPES and file_key.endswith(".weight"):
            base = file_key[: -len(".weight")]
            found = [base + s for s in WEIGHT_SCALE_SUFFIXES if base + s in table]
            if found:
                scale = found[0]
                _check_scale(scale, table[scale].shape, tuple(info.shape))
                used_scales.append(scale)
        if official in sources:
            raise FormatError(
                f"holds tensor {official!r} twice (as {sources[official].key!r} and {file_key!r})"
            )
        sources[official] = WeightSource(
            file_key,
            info.dtype,
            tuple(info.shape),
            scale,
            getattr(info, "start", None),
            tuple(table[scale].shape) if scale else None,
        )
    ignored = tuple(k for k in table if k not in rename and k not in used_scales)
    return Layout(sources, ignored=ignored, scale_keys=tuple(used_scales))


def _check_scale(key: str, shape: tuple[int, ...], weight: tuple[int, ...]) -> None:
    rows = weight[0] if weight else 1
    if len(shape) <= 1 and (not shape or shape[0] == 1):
        return  # per tensor
    if shape in ((rows,), (rows, 1)):
        return  # per output row
    raise FormatError(
        f"has scale {key!r} of shape {list(shape)} for a weight of shape {list(weight)}; only per-tensor "
        "and per-row scales are supported"
    )


def dit_layout(table: dict[str, TensorInfoLike]) -> Layout:
    """A transformer file's layout: the prefix stripped, float8 weights paired with their scales."""
    prefix = key_prefix(list(table))
    rename = {
        k: k[len(prefix) :] for k in table if k.startswith(prefix) and not _is_auxiliary(k[len(prefix) :])
    }
    layout = pair_scales(table, rename)
    return Layout(layout.sources, prefix, False, layout.ignored, None, layout.scale_keys)


def dit_layout_of_shards(tensors: dict[str, tuple[TensorInfoLike, P]]) -> tuple[Layout, dict[str, P]]:
    """``dit_layout`` of a (possibly sharded) checkpoint given as file key -> (info, shard); also
    official key -> the shard that holds it."""
    layout = dit_layout({key: info for key, (info, _) in tensors.items()})
    return layout, {key: tensors[src.key][1] for key, src in layout.sources.items()}


def t5_layout(table: dict[str, TensorInfoLike]) -> Layout:
    """A umT5 file's layout: Hugging Face names mapped to Wan's, scales paired, the embedded tokenizer found."""
    tokenizer = TOKENIZER_KEY if TOKENIZER_KEY in table else None
    hf = "shared.weight" in table or any(k.startswith("encoder.block.") for k in table)
    # the tied copy of ``shared`` is the embedding itself when a file stores only that name
    duplicates = T5_HF_DUPLICATES if "shared.weight" in table else frozenset()
    rename: dict[str, str] = {}
    for key in table:
        if key == tokenizer or _is_auxiliary(key) or (hf and key in duplicates):
            continue
        if hf:
            official = wan_t5_key(key)
            if official is None and key in T5_HF_DUPLICATES:
                official = "token_embedding.weight"
            rename[key] = (
                official if official is not None else key
            )  # unknown keys: the strict check names them
        else:
            rename[key] = key
    layout = pair_scales(table, rename)
    ignored = tuple(k for k in layout.ignored if k != tokenizer)
    return Layout(layout.sources, "", hf, ignored, tokenizer, layout.scale_keys)


def vae_layout(table: dict[str, TensorInfoLike]) -> Layout:
    """A VAE file's layout (Wan key names; a float8 file is dequantised like the others)."""
    rename = {k: k for k in table if not _is_auxiliary(k)}
    return pair_scales(table, rename)


DIT_KINDS = {16: "t2v", 36: "i2v", 48: "ti2v"}  # patch-embedding input channels -> model type


def dit_kind(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The model type a DiT's official-key shapes belong to (A14B t2v 16 / i2v 36 input channels,
    ti2v-5B 48 input and output channels, dim 3072), or None when the shapes say no DiT."""
    patch = shapes.get("patch_embedding.weight")
    if patch is None or len(patch) != 5:
        return None
    return DIT_KINDS.get(patch[1])
