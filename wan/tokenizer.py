"""Prompt cleaning and the umT5 tokenizer, loaded strictly offline from ``<ckpt>/google/umt5-xxl``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import regex  # upstream cleans with the `regex` module; its \s is not exactly the stdlib's
import torch

from wan.errors import CheckpointError
from wan.weight_formats import TOKENIZER_KEY

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


class EmbeddedTokenizer:
    """The umT5 tokenizer of a text-encoder file that embeds its sentencepiece model (the ``spiece_model``
    byte tensor of ComfyUI's umT5 files), run by sentencepiece itself, as ComfyUI runs it: the same
    cleaning, EOS, truncation and padding as `Tokenizer`."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
        self.eos_id, self.pad_id = self.processor.eos_id(), max(self.processor.pad_id(), 0)
        if self.eos_id < 0:
            raise ValueError("the embedded sentencepiece model has no EOS piece")

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def __call__(self, texts: list[str] | str, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both int64 [B, text_len] (PAD after EOS)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), text_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), text_len), dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [*self.processor.encode(clean_text(text))[: text_len - 1], self.eos_id]  # EOS kept
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[row, : len(tokens)] = 1
        return ids, mask


def load_tokenizer(path: str | Path) -> Tokenizer | EmbeddedTokenizer:
    """Load the tokenizer folder (``<ckpt>/google/umt5-xxl``), or the sentencepiece model embedded in a
    umT5 ``.safetensors`` file, from disk only; never touches the network."""
    path = Path(path)
    if path.is_file():
        return load_embedded_tokenizer(path)
    return load_tokenizer_folder(path)


def load_embedded_tokenizer(path: Path) -> EmbeddedTokenizer:
    """The tokenizer stored as the ``spiece_model`` byte tensor of a text-encoder file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            proto = f.get_tensor(TOKENIZER_KEY).numpy().tobytes()
        return EmbeddedTokenizer(proto)
    except Exception as err:  # a damaged or foreign file: say which and what to pass instead
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: cannot read its embedded tokenizer ({reason}); pass the google/umt5-xxl folder as "
            "--tokenizer"
        ) from None


def load_tokenizer_folder(folder: Path) -> Tokenizer:
    """The tokenizer of a folder like ``google/umt5-xxl`` (tokenizer.json, or spiece.model)."""
    from transformers import AutoTokenizer

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
