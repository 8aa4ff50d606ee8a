"""The text stage in timed parts: library imports, tokenizer load, umT5 read, encode.

The tokenizer and the encoder are loaded once per process (a batch reuses them); each item's
``text_stage_s`` holds the parts its own text stage paid, so the first item of a run shows the loading
and the later ones the encode alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from wan.text_encoder import TextEncoder
from wan.tokenizer import EmbeddedTokenizer, Tokenizer, load_tokenizer

KEEP_CONTEXTS = 4  # encoded prompts kept for reuse (the negative prompt above all); a few MB at most


@contextmanager
def timed(parts: dict[str, float], name: str, device: torch.device | None = None) -> Iterator[None]:
    """Add the block's wall time to ``parts[name]``; with a CUDA ``device``, its queued work included."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        parts[name] = parts.get(name, 0.0) + time.perf_counter() - start


def initialise_device(device: torch.device) -> float:
    """Create the CUDA context now (a first allocation) and return the seconds it took; 0 on the CPU.

    Done once up front so that it is reported as itself instead of inflating the first stage that
    happens to touch the device."""
    if device.type != "cuda":
        return 0.0
    start = time.perf_counter()
    torch.empty(1, device=device)
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def load_text_side(
    t5_path: Path, tokenizer_path: Path, *, device: torch.device, parts: dict[str, float]
) -> tuple[TextEncoder, Tokenizer | EmbeddedTokenizer]:
    """The umT5 encoder (bf16 on ``device``, as upstream, --t5-cpu included) and the tokenizer."""
    import wan

    with timed(parts, "imports"):
        # transformers' model and tokenizer code: seconds of imports, paid here once, not inside a load
        from transformers import AutoTokenizer, UMT5EncoderModel  # noqa: F401
    with timed(parts, "tokenizer"):
        tokenizer = load_tokenizer(tokenizer_path)
    with timed(parts, "t5_read", device):
        encoder = wan.load_text_encoder(t5_path, dtype=torch.bfloat16, device=device)
    return encoder, tokenizer


def encode_timed(
    encoder: TextEncoder,
    tokenizer: Tokenizer | EmbeddedTokenizer,
    prompts: list[str],
    text_len: int,
    parts: dict[str, float],
    known: dict[tuple[str, int], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``encoder.encode`` (each prompt on its real tokens), timed as ``encode`` with its device work.

    ``known``: contexts already encoded in this process, by (prompt, text_len); a batch's items share
    the negative prompt, so it is encoded once, not once per item. The encoder is deterministic for a
    given prompt, so a reused context is the one a new encode would give."""
    known = {} if known is None else known
    missing = [p for p in dict.fromkeys(prompts) if (p, text_len) not in known]
    if missing:
        with timed(parts, "encode", encoder.device):
            for prompt, context in zip(missing, encoder.encode(missing, tokenizer, text_len), strict=True):
                known[(prompt, text_len)] = context
    contexts = [known[(p, text_len)] for p in prompts]
    for prompt in prompts:  # most recently used last; a long batch of distinct prompts keeps a few
        known[(prompt, text_len)] = known.pop((prompt, text_len))
    while len(known) > KEEP_CONTEXTS:
        del known[next(iter(known))]
    return contexts
