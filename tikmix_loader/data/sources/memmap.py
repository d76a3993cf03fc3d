"""Flat token memmaps (nanoGPT style): ``NAME.bin`` of raw token ids plus a ``NAME.json`` sidecar.

The sidecar is small: ``{"format": "tikmix-memmap", "version": 1, "dtype": "uint16", "vocab_size": 258,
"eos_id": 256, "pad_id": 257, "num_tokens": N, "doc_offsets": "NAME.offsets.npy"}`` (the ids are
optional). Document boundaries live in the int64 ``.npy`` it names (``num_docs + 1`` offsets into the token
array, starting at 0 and ending at ``num_tokens``) rather than inline, so the sidecar stays small for
billions of documents.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tikmix_loader.data import _compiled
from tikmix_loader.data.sources._token_info import read_token_info
from tikmix_loader.data.sources._tokens import WRITE_DTYPES, cast_tokens
from tikmix_loader.data.sources.base import TokenSource, concatenated_ranges
from tikmix_loader.errors import ShardError

SIDECAR_FORMAT = "tikmix-memmap"
SUPPORTED_DTYPES = WRITE_DTYPES
# Token-range reads run in compiled code (``_compiled``'s ``gather_ranges``). Without it, reads of at most
# this many ranges are checked and sliced one by one in Python ints: a rank at large world size reads a few
# ranges per domain and batch, where numpy calls cost more than the slicing.
SCALAR_RANGES = 32


def sidecar_path(bin_path: str | os.PathLike) -> Path:
    """The JSON sidecar that belongs to a ``.bin`` token file."""
    return Path(bin_path).with_suffix(".json")


class MemmapSource(TokenSource):
    """Documents of a flat ``.bin`` token file, memory-mapped, with boundaries from its sidecar.

    Args:
        path (str | PathLike): The ``.bin`` file, or a directory holding exactly one. Its sidecar ``.json``
            must sit beside it.
        vocab_size (int, optional): Overrides the sidecar's vocabulary size. Default: ``None``.
    """

    def __init__(self, path: str | os.PathLike, *, vocab_size: int | None = None):
        path = _resolve_bin(Path(path))
        self.path = str(path)
        meta = _read_sidecar(path)
        self.dtype = np.dtype(meta["dtype"])
        from tikmix_loader.data.tokenizer import ByteTokenizer  # here: tokenizer.py imports this package

        self.token_info = read_token_info(meta, str(sidecar_path(path)))
        if ByteTokenizer.vocab_size == self.token_info.get("vocab_size") and "eos_id" not in self.token_info:
            # Sidecars from before ids were recorded: 258 is the byte tokenizer's vocabulary, so its ids.
            self.token_info = {
                **self.token_info,
                "eos_id": ByteTokenizer.eos_id,
                "pad_id": ByteTokenizer.pad_id,
            }
        self.vocab_size = vocab_size if vocab_size is not None else self.token_info.get("vocab_size")
        expected_bytes = int(meta["num_tokens"]) * self.dtype.itemsize
        actual_bytes = os.path.getsize(path)
        if actual_bytes != expected_bytes:
            raise ShardError(
                f"{self.path}: holds {actual_bytes} bytes but its sidecar declares {meta['num_tokens']} "
                f"{self.dtype} tokens ({expected_bytes} bytes); the file is truncated or the sidecar is "
                f"stale. Re-run `tikmix convert`."
            )
        # Plain ndarray views of the mappings: indexing an ``np.memmap`` wraps every result in a memmap
        # object, a cost each of a rank's small reads would pay.
        self._tokens = np.asarray(
            np.memmap(path, dtype=self.dtype, mode="r") if expected_bytes else np.zeros(0, self.dtype)
        )
        offsets_file = Path(path).parent / meta["doc_offsets"]
        try:
            self._offsets = np.asarray(np.load(offsets_file, mmap_mode="r"))
        except (OSError, ValueError) as exc:
            raise ShardError(
                f"{offsets_file}: cannot read the document offsets of {self.path}: {exc}"
            ) from exc
        offsets = self._offsets
        if (
            offsets.ndim != 1
            or len(offsets) < 1
            or offsets[0] != 0
            or offsets[-1] != int(meta["num_tokens"])
            or np.any(np.diff(offsets) < 0)
        ):
            raise ShardError(
                f"{offsets_file}: document offsets must be non-decreasing, start at 0 and end at num_tokens="
                f"{meta['num_tokens']} declared by {sidecar_path(path)}. Re-run `tikmix convert`."
            )

    @property
    def num_docs(self) -> int:
        return len(self._offsets) - 1

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self._offsets).astype(np.int64, copy=False)

    def lengths_of(self, docs: np.ndarray) -> np.ndarray:
        return self._offsets[docs + 1] - self._offsets[docs]

    def read_docs(self, start: int, stop: int) -> list[np.ndarray]:
        if not 0 <= start <= stop <= self.num_docs:
            raise IndexError(f"{self.path}: document range [{start}, {stop}) outside [0, {self.num_docs}).")
        if start == stop:
            return []
        offsets = np.asarray(self._offsets[start : stop + 1])
        tokens = np.asarray(self._tokens[offsets[0] : offsets[-1]])
        self.check_token_ids(tokens, f"{self.path} (documents {start}..{stop - 1})")
        return np.split(tokens, offsets[1:-1] - offsets[0])

    def read_doc_ranges(self, docs: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        where = lambda: f"{self.path} (documents {np.min(docs)}..{np.max(docs)})"  # built only on an error
        library = _compiled.module() if self._offsets.dtype == np.int64 else None
        if library is not None:  # compiled: checked and copied range by range; None when one is out of bounds
            tokens = library.gather_ranges(self._tokens, self._offsets, docs, starts, stops)
            if tokens is not None:
                return self.check_token_ids(tokens, where)
        # Python: the error naming a range out of bounds, and the reads when the compiled helpers are missing.
        spans = self._few_spans(docs, starts, stops) if len(docs) <= SCALAR_RANGES else None
        if spans is not None:  # a rank's few ranges, checked: slice and join them
            tokens = np.concatenate([self._tokens[start:stop] for start, stop in spans])
        else:  # one gather from the mapped file: only the wanted tokens are touched, no per-document call
            docs, starts, stops = self.check_doc_ranges(docs, starts, stops)
            tokens = self._tokens[concatenated_ranges(self._offsets[docs] + starts, stops - starts)]
        return self.check_token_ids(tokens, where)

    def _few_spans(self, docs, starts, stops) -> list[tuple[int, int]] | None:
        """The file spans ``[start, stop)`` of a few token ranges, in Python ints (numpy calls on arrays this
        small cost more than the loop); ``None`` when there are none or one does not fit its document (then
        ``check_doc_ranges`` says which)."""
        offsets, spans = self._offsets, []
        for doc, start, stop in zip(
            *(np.asarray(values, np.int64).tolist() for values in (docs, starts, stops))
        ):
            if not 0 <= doc < len(offsets) - 1:
                return None
            first = int(offsets[doc])
            if not 0 <= start <= stop <= int(offsets[doc + 1]) - first:
                return None
            spans.append((first + start, first + stop))
        return spans or None

    def __getstate__(self) -> dict:
        # Pickling a memmap copies its data; spawned loader workers re-map the file instead.
        state = self.__dict__.copy()
        del state["_tokens"], state["_offsets"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], vocab_size=state["vocab_size"])


def write_memmap(
    bin_path: str | os.PathLike,
    documents: Iterable[np.ndarray],
    *,
    dtype: str = "uint16",
    vocab_size: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> Path:
    """Write ``documents`` as a flat token file with its offsets ``.npy`` and JSON sidecar.

    The token file is streamed, so documents need not fit in memory together. ``vocab_size``, ``eos_id``
    and ``pad_id`` are recorded in the sidecar when given. Returns the ``.bin`` path.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ShardError(f"{bin_path}: `dtype` must be one of {SUPPORTED_DTYPES}, got {dtype!r}.")
    bin_path = Path(bin_path)
    offsets = [0]
    with open(bin_path, "wb") as handle:
        for index, document in enumerate(documents):
            tokens = cast_tokens(document, dtype, f"{bin_path} (document {index})")
            handle.write(tokens.tobytes())
            offsets.append(offsets[-1] + int(tokens.size))
    offsets_name = bin_path.with_suffix(".offsets.npy").name
    np.save(bin_path.parent / offsets_name, np.asarray(offsets, dtype=np.int64))
    meta = {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "dtype": dtype,
        "vocab_size": vocab_size,
        **{key: value for key, value in (("eos_id", eos_id), ("pad_id", pad_id)) if value is not None},
        "num_tokens": offsets[-1],
        "doc_offsets": offsets_name,
    }
    sidecar_path(bin_path).write_text(json.dumps(meta, indent=2))
    return bin_path


def _resolve_bin(path: Path) -> Path:
    """``path`` itself, or the single ``.bin`` inside it when it is a directory."""
    if not path.is_dir():
        return path
    candidates = sorted(path.glob("*.bin"))
    if len(candidates) != 1:
        raise ShardError(
            f"{path}: a memmap directory must hold exactly one .bin token file, found "
            f"{[candidate.name for candidate in candidates]}; point `path` at the .bin file itself."
        )
    return candidates[0]


def _read_sidecar(bin_path: Path) -> dict:
    sidecar = sidecar_path(bin_path)
    if not bin_path.is_file():
        raise ShardError(f"{bin_path}: token file not found.")
    try:
        meta = json.loads(sidecar.read_text())
    except FileNotFoundError as exc:
        raise ShardError(
            f"{sidecar}: sidecar of {bin_path} not found; it must give dtype and offsets."
        ) from exc
    except json.JSONDecodeError as exc:
        raise ShardError(f"{sidecar}: sidecar is not valid JSON ({exc}); re-run `tikmix convert`.") from exc
    missing = {"dtype", "num_tokens", "doc_offsets"} - set(meta)
    if meta.get("format") != SIDECAR_FORMAT or missing:
        raise ShardError(
            f"{sidecar}: not a {SIDECAR_FORMAT} sidecar (format={meta.get('format')!r}, "
            f"missing {sorted(missing)})."
        )
    if meta["dtype"] not in SUPPORTED_DTYPES:
        raise ShardError(f"{sidecar}: dtype {meta['dtype']!r} is not one of {SUPPORTED_DTYPES}.")
    return meta
