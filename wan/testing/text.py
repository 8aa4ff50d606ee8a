"""Tiny text-encoder checkpoints and tokenizer folders in the official Wan layout.

``tiny_t5_state_dict`` makes a random umT5 encoder state dict with the key names of the official
``models_t5_umt5-xxl-enc-bf16.pth``; ``write_tiny_tokenizer`` writes a ``google/umt5-xxl``-style
folder (``tokenizer.json`` + ``tokenizer_config.json``) from a sentencepiece unigram model trained
on a fixed corpus. Both are deterministic and need no network.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

# Fixed training text: the Wan example prompts plus a few plain sentences. ASCII only, so every
# piece is Latin and other scripts map to <unk>, as in the checkpoint folders of the end-to-end goldens.
TOKENIZER_CORPUS: tuple[str, ...] = (
    "a cat walks on the grass, realistic",
    "a white cat on a surfboard",
    "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard.",
    "The fluffy-furred feline gazes directly at the camera with a relaxed expression.",
    "Blurred beach scenery forms the background featuring crystal-clear waters and distant green hills.",
    "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage.",
    "A close-up shot highlights the intricate details and the refreshing atmosphere of the seaside.",
    "An astronaut rides a horse across the desert at sunset, cinematic lighting.",
    "A red fox runs through the snowy forest while the camera pans slowly to the left.",
    "Low quality, blurry, static, overexposed, extra fingers, deformed hands, messy background.",
)


def tiny_t5_state_dict(
    *,
    vocab_size: int = 128,
    dim: int = 32,
    dim_attn: int | None = None,
    dim_ffn: int = 64,
    num_heads: int = 4,
    num_layers: int = 2,
    num_buckets: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random umT5 encoder weights under the official Wan key names (one relative bias per block)."""
    dim_attn = dim if dim_attn is None else dim_attn
    generator = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=generator) * in_features**-0.5

    def norm(width: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(width, generator=generator)

    state = {"token_embedding.weight": torch.randn(vocab_size, dim, generator=generator)}
    for i in range(num_layers):
        block = f"blocks.{i}."
        state[block + "norm1.weight"] = norm(dim)
        for name in "qkv":
            state[block + f"attn.{name}.weight"] = linear(dim_attn, dim)
        state[block + "attn.o.weight"] = linear(dim, dim_attn)
        state[block + "norm2.weight"] = norm(dim)
        state[block + "ffn.gate.0.weight"] = linear(dim_ffn, dim)
        state[block + "ffn.fc1.weight"] = linear(dim_ffn, dim)
        state[block + "ffn.fc2.weight"] = linear(dim, dim_ffn)
        state[block + "pos_embedding.embedding.weight"] = 0.5 * torch.randn(
            num_buckets, num_heads, generator=generator
        )
    state["norm.weight"] = norm(dim)
    return {key: value.to(dtype) for key, value in state.items()}


def train_tiny_sentencepiece(vocab_size: int = 64, corpus: tuple[str, ...] = TOKENIZER_CORPUS) -> bytes:
    """A serialized sentencepiece unigram model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        # identity: the T5Tokenizer built from the pieces has no normalizer, so both tokenize alike
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        hard_vocab_limit=False,
        num_threads=1,  # one thread keeps the trained model byte-identical across runs
        minloglevel=2,
    )
    return model.getvalue()


def write_tiny_tokenizer(
    folder: str | Path, *, vocab_size: int = 64, with_spiece_model: bool = False
) -> Path:
    """Write an offline T5 tokenizer folder (like ``<ckpt>/google/umt5-xxl``) and return its path.

    ``with_spiece_model`` also stores the sentencepiece model as ``spiece.model``, as the real folder has.
    """
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = Path(folder)
    proto = train_tiny_sentencepiece(vocab_size)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    # transformers 5 silently ignores T5Tokenizer(vocab_file=...) (4-token vocab): pass the pieces
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    if with_spiece_model:
        (folder / "spiece.model").write_bytes(proto)
    return folder
