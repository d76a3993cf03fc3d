"""Per-document quality scores stored beside a domain's data: where they live, writing and reading them.

A score of criterion ``NAME`` is one float per document, in storage order, kept as ``quality/NAME.npy``
inside the dataset directory (MDS or Parquet directory; fetched from the remote like the length index for
remote MDS), or in ``STEM.quality/NAME.npy`` beside a single ``STEM.bin`` memmap or ``STEM.parquet`` file.
A Parquet domain may instead carry the score as a scalar column of the same name (a classifier score a
user wrote with the text); the sidecar wins when both exist. Reading never decodes a document.
See ``docs/quadmix.md``.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import numpy as np

from tikmix_loader.data.domain import Domain
from tikmix_loader.errors import ScoreError, ShardError

SCORES_DIR = "quality"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_criterion_name(name: str) -> str:
    """``name`` if it can be a file name on every platform (letters, digits, ``_.-``), else ``ScoreError``."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".npy"):
        raise ScoreError(
            f"Quality criterion name {name!r} is not usable as a file name; use letters, digits, '_', '.', "
            f"'-' (e.g. 'ref_ppl')."
        )
    return name


def scores_dir(path: str | os.PathLike) -> Path:
    """The folder holding the score files of the dataset at ``path`` (a directory or a single file)."""
    path = Path(path)
    return path / SCORES_DIR if path.is_dir() else path.with_suffix(f".{SCORES_DIR}")


def write_scores(path: str | os.PathLike, criterion: str, values, *, num_docs: int) -> Path:
    """Store ``values`` (one finite float per document) as criterion ``criterion`` of the dataset at ``path``.

    The file is written to a temporary name and renamed, so a crash never leaves a half-written score.
    Returns the file written.
    """
    check_criterion_name(criterion)
    values = _checked(
        np.asarray(values, dtype=np.float32),
        num_docs,
        f"Scores {criterion!r} for {path}",
        "every document needs one finite score",
    )
    folder = scores_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{criterion}.npy"
    partial = folder / f".{criterion}.{uuid.uuid4().hex}.npy.tmp"  # a plain open: the umask sets its mode
    with open(partial, "wb") as handle:
        np.save(handle, values)
    os.replace(partial, target)
    return target


def list_criteria(domain: Domain) -> list[str]:
    """Names of the score sidecars present locally for ``domain``, sorted."""
    folder = scores_dir(domain.path)
    return sorted(file.stem for file in folder.glob("*.npy")) if folder.is_dir() else []


def read_scores(domain: Domain, criteria) -> dict[str, np.ndarray]:
    """Scores of ``domain`` for each name in ``criteria``, float64 ``[num_docs]`` in storage order."""
    return {name: _read_one(domain, check_criterion_name(name)) for name in criteria}


def _read_one(domain: Domain, criterion: str) -> np.ndarray:
    sidecar = scores_dir(domain.path) / f"{criterion}.npy"
    source = domain.source
    try:
        if hasattr(source, "read_doc_array") and (sidecar.is_file() or getattr(source, "remote", None)):
            values = source.read_doc_array(f"{SCORES_DIR}/{criterion}.npy")
        elif sidecar.is_file():
            values = np.load(sidecar, mmap_mode="r")
        elif hasattr(source, "read_doc_column"):
            values = source.read_doc_column(criterion)
        else:
            raise ScoreError(f"no file {sidecar}")
    except (ShardError, OSError, ValueError) as exc:
        if isinstance(exc, ScoreError):
            exc = exc.args[0]
        raise ScoreError(
            f"Domain {domain.name!r} ({domain.path}): no readable quality score {criterion!r} ({exc}). "
            f"Compute it with `tikmix score` or name a criterion it has: {list_criteria(domain)}."
        ) from None
    return _checked(
        np.asarray(values, dtype=np.float64),
        domain.num_docs,
        f"Domain {domain.name!r}: score {criterion!r}",
        "the scores were computed for other data or damaged; re-run `tikmix score`",
    )


def _checked(values: np.ndarray, num_docs: int, where: str, fix: str) -> np.ndarray:
    """``values`` if it holds one finite value per document, else a ``ScoreError`` naming ``where``."""
    if values.shape != (num_docs,):
        raise ScoreError(
            f"{where}: expected one value per document ({num_docs} documents), got shape {values.shape}; "
            f"{fix}."
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ScoreError(
            f"{where}: {len(bad)} values are NaN or infinite (first at document {int(bad[0])}); {fix}."
        )
    return values
