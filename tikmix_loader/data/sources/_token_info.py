"""The token ids' EOS, PAD and vocabulary as a converter records them inside a format's own metadata.

``tikmix convert`` writes the same small mapping into the MDS ``index.json`` (key ``"tikmix"``), the Parquet
schema metadata (key ``b"tikmix"``) and the memmap sidecar, so a dataset carries them even without its
``tikmix.json``: a remote MDS domain downloads only ``index.json``, and Parquet files are often copied
without their folder.
"""

from __future__ import annotations

from collections.abc import Mapping

from tikmix_loader.errors import ShardError

EMBED_KEY = "tikmix"
TOKEN_INFO_KEYS = ("eos_id", "pad_id", "vocab_size")


def token_info_of(tokenizer) -> dict:
    """The mapping to embed for ``tokenizer`` (with ``name``, ``eos_id``, ``pad_id`` and ``vocab_size``)."""
    return {"tokenizer": tokenizer.name, **{key: int(getattr(tokenizer, key)) for key in TOKEN_INFO_KEYS}}


def read_token_info(data, where: str) -> dict:
    """The ids in an embedded mapping (absent keys left out); raises ``ShardError`` naming ``where``."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ShardError(f"{where}: the {EMBED_KEY!r} entry must be an object, got {data!r}; re-convert.")
    info = {key: data[key] for key in TOKEN_INFO_KEYS if data.get(key) is not None}
    for key, value in info.items():
        low = 1 if key == "vocab_size" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ShardError(
                f"{where}: {EMBED_KEY}.{key} must be an int >= {low}, got {value!r}; re-convert."
            )
    return info
