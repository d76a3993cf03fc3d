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
"""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, with EOS = 256 and PAD = 257 (vocabulary of 258)."""

    name = "bytes"
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as uint16 (no EOS appended)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        """Text of ``ids``; special ids are dropped, invalid UTF-8 is replaced."""
        data = bytes(int(i) for i in np.asarray(ids).ravel() if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")
