"""Prompt cleaning and the umT5 tokenizer, loaded strictly offline from ``<ckpt>/google/umt5-xxl``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import regex  # upstream cleans with the `regex` module; its \s is not exactly the stdlib's
import torch

from wan.errors import CheckpointError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The real google/umt5-xxl folder has spiece.model, tokenizer.json, tokenizer_config.json and
# special_tokens_map.json; the vocabulary comes from tokenizer.json or, failing that, spiece.model.
VOCAB_FILES = ("tokenizer.json", "spiece.model")
_WHITESPACE = regex.compile(r"\s+")


def basic_clean(text: str) -> str:
    """Repair mojibake and unescape HTML entities (twice, as upstream, so ``&amp;amp;`` becomes ``&``)."""
    text = ftfy.fix_text(text)  # also maps full-width punctuation such as '，' to ','
    return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def clean_text(text: str) -> str:
    """Upstream's ``clean='whitespace'`` prompt cleaning, applied before tokenization."""
    return whitespace_clean(basic_clean(text))


class Tokenizer:
    """umT5 tokenizer: cleans prompts, appends EOS, pads or truncates to ``text_len``."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase):
        self.hf_tokenizer = hf_tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    def __call__(self, texts: list[str] | str, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both int64 [B, text_len] (PAD = 0 after EOS)."""
        if isinstance(texts, str):
            texts = [texts]
        batch = self.hf_tokenizer(
            [clean_text(text) for text in texts],
            padding="max_length",
            truncation=True,  # keeps the EOS: a long prompt becomes text_len - 1 tokens + </s>
            max_length=text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load the tokenizer folder (``<ckpt>/google/umt5-xxl``) from disk only; never touches the network."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    expected = "tokenizer.json + tokenizer_config.json (or spiece.model), as in google/umt5-xxl"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder not found; expected a folder with {expected}")
    # without a vocabulary file AutoTokenizer silently builds a 4-token T5 vocab: refuse instead
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        raise CheckpointError(f"{folder}: no tokenizer files; expected {expected}")
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{folder}: cannot load the tokenizer ({reason}); expected {expected}"
        ) from None
    return Tokenizer(hf_tokenizer)
