"""Casting documents to a storage dtype without silently wrapping ids that do not fit."""

from __future__ import annotations

import numpy as np

from tikmix_loader.errors import ShardError

WRITE_DTYPES = ("uint8", "uint16", "int32", "uint32", "int64")


def token_dtype_for(vocab_size: int) -> str:
    """The narrowest dtype every writer supports for ids ``< vocab_size``: uint16 up to 65536, else int32."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32"


def cast_tokens(document, dtype: str, where: str) -> np.ndarray:
    """``document`` as a 1-D ``dtype`` array; raises ``ShardError`` naming ``where`` if an id does not fit."""
    if dtype not in WRITE_DTYPES:
        raise ShardError(f"{where}: `dtype` must be one of {WRITE_DTYPES}, got {dtype!r}.")
    array = np.asarray(document)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ShardError(
            f"{where}: a document must be a 1-D array of integer token ids, got shape {array.shape} "
            f"dtype {array.dtype}."
        )
    if array.size:
        info = np.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise ShardError(
                f"{where}: token ids span [{low}, {high}], which does not fit dtype {dtype} "
                f"[{info.min}, {info.max}]; choose a wider `dtype` (int32 holds any vocabulary)."
            )
    return array.astype(dtype, copy=False)
