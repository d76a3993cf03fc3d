"""Tokenizers for conversion: the built-in byte-level one, and any local Hugging Face ``tokenizer.json``.

Byte-level ids (the default everywhere, no download needed):

==========  =====  ==========================================
id          name   meaning
==========  =====  ==========================================
0 .. 255    bytes  the UTF-8 bytes of the text, one id each
256         EOS    end of document; packed mode joins documents with it
257         PAD    padding in per-document mode (always loss-masked)
==========  =====  ==========================================

``vocab_size`` is 258.

A Hugging Face tokenizer is read from a local ``tokenizer.json`` with the ``tokenizers`` package (installed
with mosaicml-streaming's ``transformers`` dependency); nothing is downloaded. Its EOS and PAD ids come from
its special tokens (see ``HFTokenizer``). ``load_tokenizer("bytes" | PATH)`` picks one of the two.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from tikmix_loader.data.sources._tokens import token_dtype_for
from tikmix_loader.errors import ConfigError, MissingExtraError

# Tried in order when the caller names no EOS/PAD token: the spellings used by GPT-2/Llama/T5/BERT families.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What conversion needs from a tokenizer: ids of a text, and the ids recorded in ``tikmix.json``."""

    name: str
    eos_id: int
    pad_id: int
    vocab_size: int
    dtype: str

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, with EOS = 256 and PAD = 257 (vocabulary of 258)."""

    name = "bytes"
    eos_id = 256
    pad_id = 257
    vocab_size = 258
    dtype = "uint16"
    sha256 = None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as uint16 (no EOS appended)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Text of ``ids``; special ids are dropped, invalid UTF-8 is replaced."""
        ids = np.asarray(ids).ravel()
        data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer read from a local ``tokenizer.json``.

    Args:
        path (str | PathLike): The ``tokenizer.json`` file, or a directory holding one.
        eos_token (str, optional): The token that ends a document. Default: ``None``, which takes the first
            of ``EOS_CANDIDATES`` in the vocabulary.
        pad_token (str, optional): The padding token. Default: ``None``, which takes the first of
            ``PAD_CANDIDATES`` in the vocabulary, else the EOS id (safe: padding is always loss-masked).

    Attributes:
        name (str): ``"hf:<absolute path>"``, recorded in ``tikmix.json``.
        sha256 (str): Hash of the ``tokenizer.json`` bytes, recorded so a dataset names its exact tokenizer.
        eos_id, pad_id, vocab_size (int): From the file; ``vocab_size`` counts added tokens.
    """

    def __init__(
        self, path: str | os.PathLike, *, eos_token: str | None = None, pad_token: str | None = None
    ):
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:
            raise MissingExtraError(
                "reading a tokenizer.json needs the `tokenizers` package; `pip install tokenizers`."
            ) from exc
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        try:
            data = file.read_bytes()
            self._tokenizer = _HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # OSError, UnicodeDecodeError, or the bare Exception tokenizers raises
            raise ConfigError(
                f"`tokenizer` {file}: cannot load a Hugging Face tokenizer.json ({exc}); pass 'bytes' or the "
                f"path of a valid tokenizer.json."
            ) from exc
        self.path = file.resolve()
        self.name = f"hf:{self.path}"
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._special_id(eos_token, EOS_CANDIDATES, "eos_token")
        pad_known = pad_token is not None or any(
            self._tokenizer.token_to_id(t) is not None for t in PAD_CANDIDATES
        )
        self.pad_id = self._special_id(pad_token, PAD_CANDIDATES, "pad_token") if pad_known else self.eos_id

    @property
    def dtype(self) -> str:
        """Storage dtype that holds every id: uint16 for vocabularies up to 65536, else int32."""
        return token_dtype_for(self.vocab_size)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` without special tokens (EOS is added by packing, not here)."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=self.dtype)

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens dropped."""
        return self._tokenizer.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=True)

    def _special_id(self, token: str | None, candidates: tuple[str, ...], argument: str) -> int:
        for candidate in (token,) if token is not None else candidates:
            token_id = self._tokenizer.token_to_id(candidate)
            if token_id is not None:
                return int(token_id)
        tried = repr(token) if token is not None else f"any of {list(candidates)}"
        raise ConfigError(
            f"`tokenizer` {self.path}: has no token {tried}; pass `{argument}=` naming its special token."
        )


def load_tokenizer(spec: str | os.PathLike | Tokenizer = "bytes", **options) -> Tokenizer:
    """The tokenizer that ``spec`` names.

    Args:
        spec (str | PathLike | Tokenizer): ``"bytes"`` for ``ByteTokenizer``; a path to a ``tokenizer.json``
            (or a directory holding one) for ``HFTokenizer``; a tokenizer object is returned as is.
            Default: ``"bytes"``.
        **options: ``eos_token`` / ``pad_token`` for ``HFTokenizer``.

    Returns:
        Tokenizer: An object with ``name``, ``eos_id``, ``pad_id``, ``vocab_size``, ``encode`` and ``decode``.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if spec == ByteTokenizer.name:
        return ByteTokenizer()
    path = Path(spec)
    if path.is_file() or (path / "tokenizer.json").is_file():
        return HFTokenizer(path, **options)
    raise ConfigError(
        f"`tokenizer` {str(spec)!r}: neither 'bytes' nor an existing tokenizer.json (or a directory holding "
        f"one); pass 'bytes' or a local Hugging Face tokenizer.json."
    )


__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer"]
