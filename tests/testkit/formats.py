"""Small token datasets on disk in every format (MDS, Parquet, memmap), written by the package's writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tikmix_loader.data.metadata import DatasetMeta
from tikmix_loader.data.sources.mds import write_mds
from tikmix_loader.data.sources.memmap import write_memmap
from tikmix_loader.data.sources.parquet import write_parquet

FORMATS = ("mds", "parquet", "memmap")
HF_TRAINING_TEXT = "Hello, world! naïve café — 🙂\nline two"


def make_domain_files(
    directory: str | Path,
    fmt: str,
    docs,
    *,
    name: str = "domain",
    dtype: str = "uint16",
    vocab_size: int = 258,
    eos_id: int = 256,
    pad_id: int = 257,
    metadata: bool = True,
    **writer_options,
) -> Path:
    """Write ``docs`` (token id sequences) as dataset ``directory/name`` in ``fmt``; return its path.

    Args:
        directory: Parent folder (e.g. pytest's ``tmp_path``).
        fmt: ``"mds"``, ``"parquet"`` or ``"memmap"``.
        docs: Sequences of int token ids, one per document (empty ones are written as is).
        name: Dataset folder name. Default: ``"domain"``.
        dtype: Storage dtype (MDS: uint16 or int32). Default: ``"uint16"``.
        vocab_size, eos_id, pad_id: Recorded in ``tikmix.json`` (and the memmap sidecar). Defaults: the byte
            tokenizer's 258 / 256 / 257.
        metadata: Write ``tikmix.json`` as ``tikmix convert`` does. Default: ``True``.
        **writer_options: Passed to the format's writer, e.g. ``size_limit=`` / ``compression=`` /
            ``hashes=`` for MDS, ``rows_per_group=`` / ``rows_per_file=`` for Parquet.

    Returns:
        Path: The dataset directory (MDS, Parquet, memmap alike), ready for ``Domain(name, path)``.
    """
    arrays = [np.asarray(doc, dtype=np.int64) for doc in docs]
    out = Path(directory) / name
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "mds":
        write_mds(out, arrays, dtype=dtype, **writer_options)
    elif fmt == "parquet":
        write_parquet(out, arrays, dtype=dtype, **writer_options)
    elif fmt == "memmap":
        write_memmap(out / "tokens.bin", arrays, dtype=dtype, vocab_size=vocab_size, **writer_options)
    else:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if metadata:
        DatasetMeta(
            name=name,
            format=fmt,
            eos_id=eos_id,
            pad_id=pad_id,
            vocab_size=vocab_size,
            dtype=dtype,
            num_docs=len(arrays),
            num_tokens=int(sum(a.size for a in arrays)),
        ).write(out)
    return out


def random_docs(num_docs: int, *, seed: int = 0, min_len: int = 1, max_len: int = 50, vocab: int = 256):
    """``num_docs`` random documents (int64 arrays) with lengths in ``[min_len, max_len]``."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(min_len, max_len + 1))) for _ in range(num_docs)]


def write_hf_tokenizer(path, specials=("<unk>", "<pad>", "</s>"), vocab_size=300):
    """Train a tiny byte-level BPE offline and save it as tokenizer.json."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([HF_TRAINING_TEXT, "hello world hello again"] * 20, trainer)
    tokenizer.save(str(path))
    return path
