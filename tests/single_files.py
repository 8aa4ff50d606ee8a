"""Tiny single-file checkpoints in the layouts other tools publish (Comfy-Org's repackaged files, kijai's
plain float8 files, Hugging Face T5 names), built from the tensors of an official tiny checkpoint, plus
the values a loader must produce from each (what an official folder "holding the same values" holds)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from wan.checkpoint_layout import locate_transformer_files
from wan.text_encoder import hf_key

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
PREFIX = "model.diffusion_model."
# the Linears Comfy-Org's scaled fp8 files store in float8: blocks, text/time embeddings, projection, head
QUANTISED = re.compile(
    r"(blocks\.\d+\..+|text_embedding\.\d+|time_embedding\.\d+|time_projection\.\d+|head\.head)"
)
DIT_FORMATS = ("fp32", "fp16", "bf16", "fp8_scaled", "fp8_rowwise", "fp8")


def official_dit_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an official transformer folder, by official key."""
    state: dict[str, torch.Tensor] = {}
    for shard in locate_transformer_files(folder).shards:
        state.update(load_file(str(shard)))
    return state


def quantise(weight: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weight and its float32 scale (0-d, or [out, 1] per row): weight ~ q * scale."""
    amax = weight.float().abs().amax(dim=1, keepdim=True) if per_row else weight.float().abs().amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    return (weight.float() / scale).to(FP8), scale


def _quantised(key: str, value: torch.Tensor) -> bool:
    return (
        key.endswith(".weight")
        and value.dim() == 2
        and QUANTISED.fullmatch(key[: -len(".weight")]) is not None
    )


def comfy_dit_state(state: dict[str, torch.Tensor], fmt: str, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """A single-file DiT in ``fmt``: fp32/fp16/bf16 (every tensor in that dtype), fp8_scaled (Comfy-Org's
    older files: 0-d ``scale_weight`` + ``scale_input``, ``scaled_fp8`` marker, a dummy scale beside a
    float16 weight), fp8_rowwise (newer names: per-row ``weight_scale``, ``input_scale``, ``comfy_quant``)
    or fp8 (plain float8 weights, no scales). Keys optionally under ``prefix``."""
    plain = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        base = key[: -len(".weight")]
        if fmt in plain:
            out[key] = value.to(plain[fmt])
        elif not _quantised(key, value):
            out[key] = value.to(torch.float16)
        elif fmt == "fp8":
            out[key] = value.to(FP8)
        elif fmt == "fp8_scaled":
            out[key], scale = quantise(value, per_row=False)
            out[f"{base}.scale_weight"] = scale.reshape(())
            out[f"{base}.scale_input"] = torch.ones(())
        elif fmt == "fp8_rowwise":
            out[key], scale = quantise(value, per_row=True)
            out[f"{base}.weight_scale"] = scale
            out[f"{base}.input_scale"] = torch.ones(())
            out[f"{base}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            raise ValueError(fmt)
    if fmt == "fp8_scaled":
        out["patch_embedding.scale_weight"] = torch.tensor(2.0)  # a leftover: the float16 weight decides
    out = {prefix + key: value for key, value in out.items()}
    if fmt == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out


def loaded_values(file_state: dict[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """The float32 values a loader must produce from a single-file state: each float8 weight times its
    scale, everything else as stored; markers and input scales dropped."""
    file_state = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in file_state.items()}
    out = {}
    for key, value in file_state.items():
        if key == "scaled_fp8" or key.endswith(
            (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
        ):
            continue
        base = key[: -len(".weight")]
        scale = file_state.get(f"{base}.scale_weight", file_state.get(f"{base}.weight_scale"))
        if value.dtype == FP8 and scale is not None:
            out[key] = value.float() * scale.float()
        else:
            out[key] = value.float()
    return out


def dequantised_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A loaded model's state under official keys, each fp8 Linear's weight as its float32 value
    (``weight.float() * scale``) and its scale left out: comparable with ``loaded_values``."""
    from wan.modules.fp8_linear import Fp8Linear

    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            state[f"{name}.weight"] = module.dequantized_weight()
            del state[f"{name}.scale_weight"]
    return state


def write_single_file(path: Path, state: dict[str, torch.Tensor], *, config_from: Path | None = None) -> Path:
    """Save ``state`` as one safetensors file; ``config_from``: copy that folder's config.json beside it
    (the tiny models' head count and text length are not the real ones, which shapes cannot tell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    if config_from is not None:
        (path.parent / "config.json").write_bytes((config_from / "config.json").read_bytes())
    return path


def hf_t5_state(official: dict[str, torch.Tensor], fmt: str = "same") -> dict[str, torch.Tensor]:
    """The umT5 encoder under Hugging Face T5 names (with transformers' tied ``encoder.embed_tokens``
    copy), as stored (``same``), in fp16, or fp8_scaled (Linears float8 with ``scale_weight``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        name = hf_key(key)
        if (
            fmt == "fp8_scaled"
            and value.dim() == 2
            and ".layer." in name
            and "relative_attention_bias" not in name
        ):
            out[name], scale = quantise(value, per_row=False)
            out[name[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        elif fmt == "fp16":
            out[name] = value.to(torch.float16)
        else:
            out[name] = value
    out["encoder.embed_tokens.weight"] = out["shared.weight"].clone()
    if fmt == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return out
