"""The umT5-XXL text encoder: official checkpoint -> ``transformers.UMT5EncoderModel``.

The official ``models_t5_umt5-xxl-enc-bf16.pth`` is a ``torch.save``'d state dict in Wan's own key
names. Its architecture is read off the tensor shapes, every key and shape is checked before any
module is built, and the weights are renamed to transformers' names and assigned into a model built
on the meta device, each tensor converted to the target dtype on arrival. With a memory-mapped file
host memory stays near one copy of the model in the target dtype (the real file is 11 GB in bf16).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from wan.checkpoint_reader import T5_NAME, ReadError, identify, map_threaded, open_tensors
from wan.errors import CheckpointError
from wan.weight_files import official_getter
from wan.weight_formats import T5_BLOCK_KEYS, T5_TOP_KEYS, FormatError, t5_layout

if TYPE_CHECKING:
    from transformers import UMT5Config, UMT5EncoderModel

OFFICIAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
MAX_DISTANCE = 128  # relative-position horizon; fixed by upstream's umt5_xxl, not stored in the file

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def hf_key(wan_key: str) -> str:
    """The transformers name of an official Wan T5 key (``token_embedding`` -> ``shared``)."""
    if wan_key in T5_TOP_KEYS:  # the name tables are the single-file reader's
        return T5_TOP_KEYS[wan_key]
    match = _BLOCK_KEY.fullmatch(wan_key)
    if match is None or match.group(2) not in T5_BLOCK_KEYS:
        raise KeyError(f"{wan_key!r} is not a key of the official umT5 encoder")
    return f"encoder.block.{match.group(1)}.{T5_BLOCK_KEYS[match.group(2)]}"


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5 encoder dimensions; umt5-xxl is vocab 256384, dim 4096, 64 heads, ffn 10240, 24 layers."""

    vocab_size: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key of the official state dict with its shape."""
        block = {
            "norm1.weight": (self.dim,),
            "attn.q.weight": (self.dim_attn, self.dim),
            "attn.k.weight": (self.dim_attn, self.dim),
            "attn.v.weight": (self.dim_attn, self.dim),
            "attn.o.weight": (self.dim, self.dim_attn),
            "pos_embedding.embedding.weight": (self.num_buckets, self.num_heads),
            "norm2.weight": (self.dim,),
            "ffn.gate.0.weight": (self.dim_ffn, self.dim),
            "ffn.fc1.weight": (self.dim_ffn, self.dim),
            "ffn.fc2.weight": (self.dim, self.dim_ffn),
        }
        shapes = {"token_embedding.weight": (self.vocab_size, self.dim)}
        for i in range(self.num_layers):
            shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
        shapes["norm.weight"] = (self.dim,)
        return shapes

    def to_hf(self) -> UMT5Config:
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab_size,
            d_model=self.dim,
            d_kv=self.dim_attn // self.num_heads,
            d_ff=self.dim_ffn,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=MAX_DISTANCE,
            feed_forward_proj="gated-gelu",  # gelu_new = tanh GELU, upstream's GELU(approximate='tanh')
            layer_norm_epsilon=1e-6,
            dropout_rate=0.0,
            # eager = explicit scores + bias, softmax, matmul: bit-identical to upstream in bf16 on CPU;
            # SDPA differs by ~2 bf16 ulps
            attn_implementation="eager",
        )


def config_from_shapes(shapes: dict[str, tuple[int, ...]], where: str | Path) -> TextEncoderConfig:
    """Read the dimensions off the tensor shapes; raise CheckpointError if this is not a umT5 encoder."""
    foreign = identify(shapes)
    if foreign and foreign != T5_NAME:
        raise CheckpointError(f"{where}: this is {foreign}, not the umT5 text encoder ({OFFICIAL_FILE})")
    for key in (
        "token_embedding.weight",
        "blocks.0.attn.q.weight",
        "blocks.0.pos_embedding.embedding.weight",
    ):
        if key not in shapes:
            raise CheckpointError(
                f"{where}: tensor {key!r} is missing; expected the umT5 encoder state dict ({OFFICIAL_FILE})"
            )
    vocab_size, dim = shapes["token_embedding.weight"]
    dim_attn = shapes["blocks.0.attn.q.weight"][0]
    num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    dim_ffn = shapes.get("blocks.0.ffn.fc1.weight", (0,))[0]
    num_layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.fullmatch(k)))
    if dim_attn % num_heads:
        raise CheckpointError(
            f"{where}: tensor 'blocks.0.attn.q.weight' has width {dim_attn}, not a multiple of the "
            f"{num_heads} heads of the relative-position table; the file is corrupt or of another model"
        )
    return TextEncoderConfig(vocab_size, dim, dim_attn, dim_ffn, num_heads, num_layers, num_buckets)


def check_state_shapes(
    shapes: dict[str, tuple[int, ...]], config: TextEncoderConfig, where: str | Path
) -> None:
    """Strict key and shape check: one line naming the first missing, unexpected or mis-shaped key."""
    expected = config.expected_shapes()
    for key, shape in expected.items():
        if key not in shapes:
            raise CheckpointError(
                f"{where}: tensor {key!r} is missing; the file is incomplete or of another model"
            )
        if tuple(shapes[key]) != shape:
            raise CheckpointError(
                f"{where}: tensor {key!r} has shape {list(shapes[key])}, expected {list(shape)} "
                f"for a {config.num_layers}-layer encoder of width {config.dim}"
            )
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor {unexpected[0]!r}; this is not a umT5 encoder state dict"
        )


class Tokenize(Protocol):
    def __call__(self, texts: list[str], text_len: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class TextEncoder(nn.Module):
    """umT5 encoder (transformers' UMT5EncoderModel) with Wan's prompt interface."""

    def __init__(self, model: UMT5EncoderModel, config: TextEncoderConfig):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.config = config

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state [B, L, dim] in the model dtype; padded rows are computed too."""
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.last_hidden_state

    def encode(self, prompts: list[str], tokenizer: Tokenize, text_len: int) -> list[torch.Tensor]:
        """Contexts [L_i, dim], one per prompt, of its real tokens (EOS included, at most ``text_len``).

        Upstream runs every prompt padded to ``text_len`` with the key mask and then keeps the real
        rows. The padded keys are masked out of every real token's attention and the relative-position
        bias depends only on offsets, so the real rows do not depend on the padding: each prompt runs on
        its real tokens only (prompts of equal length in one batch), which at 512 tokens against a short
        prompt is most of the encoder's work saved. The DiT pads contexts to its ``text_len`` itself.
        """
        input_ids, attention_mask = tokenizer(prompts, text_len)
        lengths = attention_mask.gt(0).sum(dim=1).tolist()  # host tensors: the tokenizer's output
        by_length: dict[int, list[int]] = {}
        for index, length in enumerate(lengths):
            by_length.setdefault(length, []).append(index)
        contexts: list[torch.Tensor | None] = [None] * len(prompts)
        for length, indices in by_length.items():
            ids = input_ids[indices, :length]
            hidden = self(ids, torch.ones_like(ids))
            for index, row in zip(indices, hidden, strict=True):
                contexts[index] = row
        return contexts  # type: ignore[return-value]


def text_encoder_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    where: str = "state dict",
) -> TextEncoder:
    """Build a TextEncoder from an in-memory official (Wan-named) state dict."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    return _build(shapes, state_dict.__getitem__, dtype, torch.device(device), where)


def load_text_encoder(
    path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> TextEncoder:
    """Load the official umT5 encoder from a ``.pth`` (or same-keyed ``.safetensors``) file.

    ``path`` may also be a checkpoint folder holding ``models_t5_umt5-xxl-enc-bf16.pth``. Upstream
    runs the encoder in bf16, also on CPU (``--t5_cpu``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / OFFICIAL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: text-encoder checkpoint not found (expected {OFFICIAL_FILE})")
    try:
        with open_tensors(path) as (table, get):
            # official or Hugging Face names, float8 weights dequantised (wan.weight_formats)
            layout = t5_layout(table)
            return _build(layout.shapes, official_getter(layout, get), dtype, torch.device(device), str(path))
    except ReadError as err:
        raise CheckpointError(f"{path} {err}; expected {OFFICIAL_FILE}, re-download it") from None
    except FormatError as err:
        raise CheckpointError(f"{path} {err}") from None


def _build(
    shapes: dict[str, tuple[int, ...]],
    get: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    where: str,
) -> TextEncoder:
    from transformers import UMT5EncoderModel

    config = config_from_shapes(shapes, where)
    check_state_shapes(shapes, config, where)
    with torch.device("meta"):
        model = UMT5EncoderModel(config.to_hf())
    # cast (from the file's map) on a few threads: the casts release the GIL
    tensors = map_threaded(lambda key: get(key).to(device=device, dtype=dtype), list(shapes))
    state = {hf_key(key): tensor for key, tensor in zip(shapes, tensors, strict=True)}
    # one embedding table feeds both names; upstream's T5 has a single token_embedding
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    # assign=True adopts our tensors (no second copy); every parameter comes from the file, even
    # ``wo``, which transformers' from_pretrained would keep in fp32 but upstream runs in bf16
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # assign made two Parameters: re-tie them
    return TextEncoder(model, config)
