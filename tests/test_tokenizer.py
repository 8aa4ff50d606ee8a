"""Prompt cleaning (golden cases from upstream) and the offline umT5 tokenizer."""

import json
import socket
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from goldens import entry, golden_dir, golden_params

from wan.errors import CheckpointError
from wan.testing.text import train_tiny_sentencepiece, write_tiny_tokenizer
from wan.tokenizer import clean_text, load_tokenizer

E2E_TOKENIZER = Path(__file__).parent / "data" / "umt5_tokenizer"  # copy of the e2e goldens' google/umt5-xxl


@pytest.mark.parametrize("name", golden_params("t5_text"))
def test_clean_text_matches_upstream(name):
    cases = json.loads((golden_dir() / entry(name)["file"]).read_text())["cases"]
    assert cases
    for case in cases:
        assert clean_text(case["input"]) == case["output"], case["input"]


def test_clean_text_collapses_unicode_whitespace():
    assert clean_text("\u3000 a\u00a0\u2003b \n\t c\u2029") == "a b c"
    assert clean_text("&amp;lt;tag&amp;gt;") == "<tag>"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("ckpt") / "google" / "umt5-xxl")


@pytest.fixture(scope="module")
def sentencepiece_model() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=train_tiny_sentencepiece())


def test_tiny_folder_matches_sentencepiece(tiny_folder, sentencepiece_model, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer must load without network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tokenizer = load_tokenizer(tiny_folder)
    assert sorted(p.name for p in tiny_folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]

    texts = ["a cat walks on the grass, realistic", "  The   camera\tpans &amp; a fox runs. "]
    text_len = 40
    ids, mask = tokenizer(texts, text_len)
    assert ids.shape == mask.shape == (2, text_len)
    assert ids.dtype == mask.dtype == torch.int64
    for row, row_mask, text in zip(ids, mask, texts, strict=True):
        expected = [*sentencepiece_model.encode(clean_text(text)), 1]  # + EOS
        n = len(expected)
        assert n < text_len
        assert row[:n].tolist() == expected
        assert row[n:].eq(0).all()  # PAD
        assert row_mask.tolist() == [1] * n + [0] * (text_len - n)


def test_truncation_keeps_eos(tiny_folder, sentencepiece_model):
    tokenizer = load_tokenizer(tiny_folder)
    text = "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard."
    ids, mask = tokenizer(text, 6)  # a plain string is one prompt
    assert ids.shape == (1, 6)
    assert ids[0].tolist() == [*sentencepiece_model.encode(text)[:5], 1]
    assert mask.eq(1).all()


def test_folder_with_spiece_model_loads_alike(tmp_path, tiny_folder):
    folder = write_tiny_tokenizer(tmp_path / "umt5-xxl", with_spiece_model=True)
    assert (folder / "spiece.model").is_file()
    texts = ["a red fox in the snowy forest"]
    for a, b in zip(load_tokenizer(folder)(texts, 16), load_tokenizer(tiny_folder)(texts, 16), strict=True):
        assert torch.equal(a, b)


def test_tiny_tokenizer_is_deterministic(tmp_path, tiny_folder):
    again = write_tiny_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_folder / name).read_bytes()


def test_e2e_checkpoint_tokenizer_gives_official_ids():
    from wan.configs import NEGATIVE_PROMPT

    tokenizer = load_tokenizer(E2E_TOKENIZER)
    # ids of the official HuggingfaceTokenizer on this folder (end-to-end goldens, text_len 32)
    prompts = {
        "a cat walks on the grass, realistic": [
            9,
            18,
            13,
            29,
            8,
            3,
            25,
            3,
            17,
            5,
            40,
            6,
            30,
            4,
            3,
            44,
            59,
            8,
            37,
            1,
        ],
        "a white cat on a surfboard": [9, 13, 7, 38, 5, 18, 3, 25, 9, 19, 6, 43, 52, 24, 64, 6, 48, 1],
        # Chinese is <unk> (2) here; ftfy turned the full-width commas into ',' (4); truncation keeps EOS
        NEGATIVE_PROMPT: [3] + [2, 4] * 15 + [1],
    }
    for prompt, expected in prompts.items():
        ids, mask = tokenizer([prompt], 32)
        assert ids[0].tolist() == expected + [0] * (32 - len(expected))
        assert mask[0].tolist() == [1] * len(expected) + [0] * (32 - len(expected))


def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path / "google" / "umt5-xxl")
    message = str(err.value)
    assert "\n" not in message and "umt5-xxl" in message and "tokenizer.json" in message


def test_folder_without_vocabulary_is_one_line(tmp_path, tiny_folder):
    folder = tmp_path / "umt5-xxl"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_bytes((tiny_folder / "tokenizer_config.json").read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "spiece.model" in message


def embedded_tokenizer_file(path: Path, proto: bytes) -> Path:
    """A umT5-style .safetensors file that carries its sentencepiece model as a `spiece_model` byte tensor."""
    from safetensors.torch import save_file

    tensors = {
        "shared.weight": torch.zeros(4, 2),
        "spiece_model": torch.frombuffer(bytearray(proto), dtype=torch.uint8),
    }
    save_file(tensors, str(path))
    return path


def test_an_embedded_tokenizer_gives_the_ids_of_the_folder(tmp_path, tiny_folder):
    file = embedded_tokenizer_file(tmp_path / "umt5.safetensors", train_tiny_sentencepiece())
    embedded, folder = load_tokenizer(file), load_tokenizer(tiny_folder)
    assert embedded.vocab_size == folder.vocab_size
    texts = [
        "a red fox in the snowy forest",
        "  Summer   beach &amp;amp; a white cat\nwearing sunglasses  ",
        "",
        "cat " * 40,  # truncated: the EOS stays last
    ]
    for text_len in (8, 32):
        for a, b in zip(embedded(texts, text_len), folder(texts, text_len), strict=True):
            assert torch.equal(a, b)


def test_a_file_without_a_readable_tokenizer_is_one_clear_error(tmp_path):
    file = embedded_tokenizer_file(tmp_path / "umt5.safetensors", b"not a sentencepiece model")
    with pytest.raises(
        CheckpointError, match=r"cannot read its embedded tokenizer .*pass the google/umt5-xxl"
    ):
        load_tokenizer(file)
