"""Tokenizers: the byte-level id table, local Hugging Face tokenizer.json files, and ``load_tokenizer``."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from testkit.formats import HF_TRAINING_TEXT as TEXT
from testkit.formats import write_hf_tokenizer
from tokenizers import Tokenizer

from tikmix_loader import ConfigError
from tikmix_loader.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_ids():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(TEXT)
    assert ids.dtype == np.uint16 and ids.max() < 256
    np.testing.assert_array_equal(ids, list(TEXT.encode("utf-8")))
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size, tokenizer.dtype) == (
        256,
        257,
        258,
        "uint16",
    )
    assert tokenizer.decode(np.append(ids, [256, 257])) == TEXT  # special ids are dropped


def test_hf_tokenizer_from_file_and_directory(tmp_path):
    path = write_hf_tokenizer(tmp_path / "tokenizer.json")
    for spec in (path, tmp_path, str(path)):
        tokenizer = load_tokenizer(spec)
        assert isinstance(tokenizer, HFTokenizer)
        assert tokenizer.eos_id == 2 and tokenizer.pad_id == 1  # "</s>" and "<pad>"
        assert tokenizer.vocab_size == Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        assert tokenizer.dtype == "uint16"
        assert tokenizer.name == f"hf:{path.resolve()}"
        assert tokenizer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    ids = tokenizer.encode(TEXT)
    assert ids.dtype == np.uint16 and 2 not in ids.tolist()  # no special tokens added
    assert len(ids) < len(TEXT.encode())  # merges happened
    assert tokenizer.decode(ids) == TEXT


def test_hf_tokenizer_special_token_choice(tmp_path):
    path = write_hf_tokenizer(tmp_path / "tokenizer.json", specials=("<unk>", "<|endoftext|>", "<sep>"))
    tokenizer = HFTokenizer(path)
    assert tokenizer.eos_id == 1 and tokenizer.pad_id == 1  # no pad token: padding reuses EOS
    assert HFTokenizer(path, eos_token="<sep>", pad_token="<unk>").eos_id == 2
    with pytest.raises(ConfigError, match=r"has no token '<eos>'; pass `eos_token=`"):
        HFTokenizer(path, eos_token="<eos>")


def test_hf_tokenizer_without_any_eos(tmp_path):
    path = write_hf_tokenizer(tmp_path / "tokenizer.json", specials=("<unk>",))
    with pytest.raises(
        ConfigError, match=r"has no token any of \['<\|endoftext\|>', '</s>'.*pass `eos_token=`"
    ):
        load_tokenizer(path)


def test_load_tokenizer_bad_specs(tmp_path):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    tokenizer = ByteTokenizer()
    assert load_tokenizer(tokenizer) is tokenizer
    with pytest.raises(
        ConfigError, match=r"`tokenizer` 'gpt2': neither 'bytes' nor an existing tokenizer.json"
    ):
        load_tokenizer("gpt2")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"tokenizer.json: cannot load a Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)
