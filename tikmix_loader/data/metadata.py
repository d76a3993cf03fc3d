"""``tikmix.json``: the small metadata file ``tikmix convert`` writes beside a dataset, and its reader.

It records how the token ids were made (tokenizer, EOS/PAD ids, vocabulary, dtype), the dataset's size,
and every input file with its sha256, so ``Domain`` can default its ids from it and check that no shard
went missing, and a conversion can be reproduced.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tikmix_loader.errors import ShardError

METADATA_FILE = "tikmix.json"
METADATA_FORMAT = "tikmix-dataset"


@dataclass(frozen=True)
class DatasetMeta:
    """What a converted dataset holds and how its token ids were made."""

    name: str = field(default="", metadata={"help": "Dataset name given to `tikmix convert --name`."})
    format: str = field(default="mds", metadata={"help": "Storage format: mds, parquet or memmap."})
    tokenizer: str = field(default="bytes", metadata={"help": "'bytes' or 'hf:<path of tokenizer.json>'."})
    tokenizer_sha256: str | None = field(default=None, metadata={"help": "sha256 of the tokenizer.json."})
    eos_id: int = field(default=256, metadata={"help": "Id that ends a document in packed mode."})
    pad_id: int = field(default=257, metadata={"help": "Padding id in per-document mode."})
    vocab_size: int = field(default=258, metadata={"help": "Every token id is < vocab_size."})
    dtype: str = field(default="uint16", metadata={"help": "Integer dtype the ids are stored as."})
    num_docs: int = field(default=0, metadata={"help": "Documents stored (empty inputs are not stored)."})
    num_tokens: int = field(default=0, metadata={"help": "Tokens over all documents, no separators."})
    empty_docs_dropped: int = field(
        default=0, metadata={"help": "Input documents with no tokens, not stored."}
    )
    max_doc_tokens: int | None = field(
        default=None, metadata={"help": "Longer input documents were split into pieces of at most this."}
    )
    docs_split: int = field(default=0, metadata={"help": "Input documents split by max_doc_tokens."})
    sources: tuple[dict, ...] = field(
        default=(), metadata={"help": "Input files as {'path', 'bytes', 'sha256'}, in reading order."}
    )

    def __post_init__(self):
        for name in ("eos_id", "pad_id", "num_docs", "num_tokens", "empty_docs_dropped", "docs_split"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"DatasetMeta `{name}` must be >= 0, got {getattr(self, name)}.")
        if self.vocab_size < 1:
            raise ValueError(f"DatasetMeta `vocab_size` must be >= 1, got {self.vocab_size}.")
        object.__setattr__(self, "sources", tuple(dict(source) for source in self.sources))

    def to_dict(self) -> dict:
        """JSON-able form, tagged with the file format and version."""
        return {
            "format_version": 1,
            "kind": METADATA_FORMAT,
            **dataclasses.asdict(self),
            "sources": [dict(source) for source in self.sources],
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = METADATA_FILE) -> DatasetMeta:
        """Inverse of ``to_dict``; raises ``ShardError`` naming ``where`` when ``data`` is not one."""
        if not isinstance(data, dict) or data.get("kind") != METADATA_FORMAT:
            raise ShardError(f"{where}: not a {METADATA_FORMAT} metadata file; re-run `tikmix convert`.")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in names})
        except (TypeError, ValueError) as exc:
            raise ShardError(f"{where}: invalid metadata ({exc}); re-run `tikmix convert`.") from exc

    def write(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tikmix.json`` and return its path."""
        path = Path(directory) / METADATA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def metadata_path(path: str | os.PathLike) -> Path:
    """Where the metadata of the dataset at ``path`` (its directory, or a file inside it) would be."""
    path = Path(path)
    return (path if path.is_dir() else path.parent) / METADATA_FILE


def read_dataset_meta(path: str | os.PathLike) -> DatasetMeta | None:
    """The ``DatasetMeta`` of the dataset at ``path``, or ``None`` when it has no ``tikmix.json``."""
    file = metadata_path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardError(f"{file}: not valid JSON ({exc}); re-run `tikmix convert` or delete it.") from exc
    return DatasetMeta.from_dict(data, str(file))
