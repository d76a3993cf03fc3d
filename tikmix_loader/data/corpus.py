"""``tikmix corpus``: a real multi-domain corpus built offline, from text any Python install has or text dirs.

``tikmix corpus build OUTDIR`` collects these domains (one document per file unless noted):

=============  ===================================================================================
domain         documents
=============  ===================================================================================
``code``       the standard library's ``.py`` files
``docs``       English documentation: every ``pydoc_data.topics`` entry, then each stdlib module's
               docstrings (module, classes, functions) joined into one document; test suites left out
``man``        system man pages (``/usr/share/man/man*/``, gzip'd troff), when present
``c_headers``  C headers (``/usr/include/**/*.h``), when present
``prose``      READMEs, changelogs, copyright notices… under ``/usr/share/doc``, when present
=============  ===================================================================================

Candidates are taken in an order fixed by a hash of their path until ``max_mb_per_domain`` of text is
reached; exact duplicates are left out, documents longer than ``max_doc_kb`` are cut at a line end (so a
2 MB license file does not fill a domain alone), and a built-in domain with less than
``min_mb_per_domain`` is left out. ``tikmix corpus from-text OUTDIR --domain NAME=PATH …`` does the same
for directories of raw text (with no size caps by default).

Layout: ``OUTDIR/<domain>/{train,val,test}/`` (each a ``tikmix convert`` dataset) and
``OUTDIR/manifest.json``. Splits are per document and fixed by a hash of its id (``val_fraction`` and
``test_fraction``, topped up to ``min_eval_docs`` from train). The manifest lists every document and
every candidate left out, with the sha256 of its source file; building again into the same OUTDIR with
unchanged inputs and options reuses the corpus instead of rebuilding it.

``--inject-noise RATE`` adds damaged copies of real documents to each domain's train split (val and test
stay clean) so that they are ``RATE`` of it (kinds and recipe in ``tikmix_loader/data/noise.py``). Their
ground truth is ``OUTDIR/<domain>/train/noise_labels.npy`` (int8 per stored document: 0 clean, ``k`` the
``k``-th of the manifest's ``noise_kinds``), read with ``noise_labels(OUTDIR, domain)``; the manifest
counts each kind per domain under ``noise``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tikmix_loader.data.convert import FORMATS, atomic_directory, expand_inputs, write_dataset
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.metadata import read_dataset_meta
from tikmix_loader.data.noise import NOISE_KINDS, check_noise_options, inject_noise
from tikmix_loader.data.tokenizer import load_tokenizer
from tikmix_loader.errors import ConfigError, ConversionError

SPLITS = ("train", "val", "test")
NOISE_LABELS_FILE = "noise_labels.npy"
MANIFEST_FILE = "manifest.json"
MANIFEST_KIND = "tikmix-corpus"
# Bump when the selection or extraction rules change, so an old corpus is rebuilt rather than reused.
BUILDER_VERSION = 1
MB = 1_000_000
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TEST_DIRS = {"test", "tests", "idle_test"}
_PROSE_SUFFIXES = {"", ".txt", ".md", ".rst", ".debian"}
_PROSE_STEMS = ("readme", "changelog", "changes", "news", "copyright", "authors", "thanks", "todo", "faq")


@dataclass(frozen=True)
class CorpusConfig:
    """Options of a corpus build; saved in the manifest, and a rebuild with other options is not reused."""

    max_mb_per_domain: float | None = field(
        default=4.0,
        metadata={"help": "Stop adding documents to a domain past this many MB of text (None: all)."},
    )
    min_mb_per_domain: float = field(
        default=0.25, metadata={"help": "Leave out a built-in domain with less text than this many MB."}
    )
    max_doc_kb: float | None = field(
        default=64.0,
        metadata={"help": "Cut longer documents at the last line end before this many KB (None: never)."},
    )
    val_fraction: float = field(default=0.05, metadata={"help": "Share of documents in the val split."})
    test_fraction: float = field(default=0.05, metadata={"help": "Share of documents in the test split."})
    min_eval_docs: int = field(default=2, metadata={"help": "Fewest documents in val and in test."})
    format: str = field(
        default="mds", metadata={"help": "Storage format of each split: mds, parquet, memmap."}
    )
    tokenizer: str = field(default="bytes", metadata={"help": "'bytes' or the path of a tokenizer.json."})
    stdlib_dir: str = field(
        default_factory=lambda: sysconfig.get_paths()["stdlib"],
        metadata={"help": "Python standard library (code and docs domains)."},
    )
    man_dir: str = field(default="/usr/share/man", metadata={"help": "Root of the man pages (man domain)."})
    include_dir: str = field(default="/usr/include", metadata={"help": "C headers (c_headers domain)."})
    doc_dir: str = field(default="/usr/share/doc", metadata={"help": "Package documentation (prose domain)."})
    inject_noise: float = field(
        default=0.0,
        metadata={"help": "Share of noisy documents added to each train split (0: none); see data/noise.py."},
    )
    noise_kinds: str = field(
        default="",
        metadata={"help": f"Comma-separated kinds of noise, of {', '.join(NOISE_KINDS)} (default: all)."},
    )
    noise_seed: int = field(default=0, metadata={"help": "Seed of the injected noise."})

    def __post_init__(self):
        if self.max_mb_per_domain is not None and not self.max_mb_per_domain > 0:
            raise ConfigError(f"`max_mb_per_domain` must be > 0 or None, got {self.max_mb_per_domain}.")
        if self.max_doc_kb is not None and not self.max_doc_kb > 0:
            raise ConfigError(f"`max_doc_kb` must be > 0 or None, got {self.max_doc_kb}.")
        if not self.min_mb_per_domain >= 0:
            raise ConfigError(f"`min_mb_per_domain` must be >= 0, got {self.min_mb_per_domain}.")
        if not (
            0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1
        ):
            raise ConfigError(
                f"`val_fraction` ({self.val_fraction}) and `test_fraction` ({self.test_fraction}) must be "
                f">= 0 and sum to < 1."
            )
        if self.min_eval_docs < 1:
            raise ConfigError(f"`min_eval_docs` must be >= 1, got {self.min_eval_docs}.")
        if self.format not in FORMATS:
            raise ConfigError(f"`format` {self.format!r} is not one of {FORMATS}.")
        check_noise_options(self.inject_noise, self.kinds_of_noise)

    @property
    def kinds_of_noise(self) -> tuple[str, ...]:
        """The noise kinds to inject, in ``NOISE_KINDS`` spelling (all when ``noise_kinds`` is empty)."""
        return tuple(kind.strip() for kind in self.noise_kinds.split(",") if kind.strip()) or NOISE_KINDS

    def to_dict(self) -> dict:
        config = dataclasses.asdict(self)
        if not self.inject_noise:  # a clean corpus keeps the manifest it had before noise existed
            for name in ("inject_noise", "noise_kinds", "noise_seed"):
                del config[name]
        return config


@dataclass(frozen=True)
class _Candidate:
    """A possible document: a stable id, the file it comes from, and how to get its text from that file."""

    id: str
    source: Path
    extract: Callable[[bytes], str]


class _Rejected(Exception):
    """A built-in candidate that holds no usable text; the reason is recorded in the manifest."""


def _hash_order(domain: str, candidates: list[_Candidate]) -> list[_Candidate]:
    # A fixed pseudo-random order spreads a size-capped domain over the whole tree, not its first folders.
    return sorted(candidates, key=lambda c: hashlib.sha256(f"{domain}:{c.id}".encode()).hexdigest())


def _decode_text(data: bytes) -> str:
    if b"\0" in data:
        raise _Rejected("binary")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Rejected("not UTF-8") from exc


def _gunzip_text(data: bytes) -> str:
    try:
        return _decode_text(gzip.decompress(data))
    except (OSError, EOFError) as exc:
        raise _Rejected("bad gzip") from exc


def _text_of(path: Path) -> Callable[[bytes], str]:
    return _gunzip_text if path.suffix == ".gz" else _decode_text


def _docstrings(data: bytes) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escapes in old modules warn on parse
        try:
            tree = ast.parse(data)
        except (SyntaxError, ValueError) as exc:
            raise _Rejected("does not parse") from exc
    text = "\n\n".join(_definition_docstrings(tree))
    if not text:
        raise _Rejected("no docstrings")
    return text


def _definition_docstrings(node: ast.AST):
    """Docstrings of ``node`` and of the classes and functions nested in its statements, in source order."""
    # Only statement lists can hold definitions, so expressions are never visited (ast.walk is ~3x slower).
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        docstring = ast.get_docstring(node)
        if docstring:
            yield docstring
    for name in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, name, ()):
            if isinstance(child, ast.stmt | ast.excepthandler):
                yield from _definition_docstrings(child)


def _stdlib_files(config: CorpusConfig) -> list[Path]:
    files = []
    # os.walk so that site-packages (often far larger than the stdlib) is pruned, not walked and filtered.
    for folder, subfolders, names in os.walk(config.stdlib_dir):
        subfolders[:] = sorted(name for name in subfolders if name not in ("site-packages", "__pycache__"))
        files.extend(Path(folder) / name for name in names if name.endswith(".py"))
    return sorted(files)


def _collect_code(config: CorpusConfig) -> list[_Candidate]:
    root = Path(config.stdlib_dir)
    return _hash_order(
        "code", [_Candidate(str(f.relative_to(root)), f, _decode_text) for f in _stdlib_files(config)]
    )


def _collect_docs(config: CorpusConfig) -> list[_Candidate]:
    import pydoc_data.topics

    topics_file = Path(pydoc_data.topics.__file__)
    topics = [
        _Candidate(f"pydoc_topics/{key}", topics_file, lambda _data, key=key: pydoc_data.topics.topics[key])
        for key in sorted(pydoc_data.topics.topics)
    ]
    root = Path(config.stdlib_dir)
    # Test suites are 60% of the stdlib but hold little prose; skipping them also halves the parsing time.
    files = [f for f in _stdlib_files(config) if not _TEST_DIRS.intersection(f.relative_to(root).parts)]
    modules = [_Candidate(f"docstrings/{f.relative_to(root)}", f, _docstrings) for f in files]
    return topics + _hash_order("docs", modules)


def _collect_man(config: CorpusConfig) -> list[_Candidate]:
    root = Path(config.man_dir)
    # Only the untranslated section folders (man1 … man9): the corpus is English.
    files = [f for section in sorted(root.glob("man*")) if section.is_dir() for f in section.rglob("*")]
    return _hash_order(
        "man", [_Candidate(str(f.relative_to(root)), f, _text_of(f)) for f in files if f.is_file()]
    )


def _collect_c_headers(config: CorpusConfig) -> list[_Candidate]:
    root = Path(config.include_dir)
    files = [f for f in sorted(root.rglob("*.h")) if f.is_file()]
    return _hash_order("c_headers", [_Candidate(str(f.relative_to(root)), f, _decode_text) for f in files])


def _is_prose(path: Path) -> bool:
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    inner = Path(name)
    return inner.suffix.lower() in _PROSE_SUFFIXES or name.lower().startswith(_PROSE_STEMS)


def _collect_prose(config: CorpusConfig) -> list[_Candidate]:
    root = Path(config.doc_dir)
    files = [f for f in sorted(root.rglob("*")) if f.is_file() and _is_prose(f)]
    return _hash_order("prose", [_Candidate(str(f.relative_to(root)), f, _text_of(f)) for f in files])


BUILTIN_DOMAINS: dict[str, Callable[[CorpusConfig], list[_Candidate]]] = {
    "code": _collect_code,
    "docs": _collect_docs,
    "man": _collect_man,
    "c_headers": _collect_c_headers,
    "prose": _collect_prose,
}


def _builtin_roots(config: CorpusConfig) -> dict[str, str]:
    return {
        "code": config.stdlib_dir,
        "docs": config.stdlib_dir,
        "man": config.man_dir,
        "c_headers": config.include_dir,
        "prose": config.doc_dir,
    }


def _collect_text_dir(domain: str, root: Path) -> list[_Candidate]:
    def strict(file: Path) -> Callable[[bytes], str]:
        def extract(data: bytes) -> str:
            try:
                return (gzip.decompress(data) if file.suffix == ".gz" else data).decode("utf-8")
            except (UnicodeDecodeError, OSError, EOFError) as exc:
                raise ConversionError(
                    f"domain {domain!r}: {file} is not UTF-8 text ({exc}); remove it from {root} or "
                    f"convert it to UTF-8."
                ) from exc

        return extract

    base = root if root.is_dir() else root.parent
    return _hash_order(
        domain, [_Candidate(str(f.relative_to(base)), f, strict(f)) for f in expand_inputs([root])]
    )


class _FileHashes:
    """sha256 of source files, each read once per build (many topics share one file)."""

    def __init__(self):
        self._last: tuple[Path, bytes, str] | None = None
        self._known: dict[Path, str] = {}

    def read(self, path: Path) -> tuple[bytes, str]:
        if self._last is None or self._last[0] != path:
            data = path.read_bytes()
            self._last = (path, data, hashlib.sha256(data).hexdigest())
            self._known[path] = self._last[2]
        return self._last[1], self._last[2]

    def sha256(self, path: Path) -> str:
        if path not in self._known:
            self.read(path)
        return self._known[path]


def _listing_hash(candidates: list[_Candidate]) -> str:
    listing = "\n".join(f"{c.id}\t{c.source}" for c in candidates)
    return hashlib.sha256(listing.encode()).hexdigest()


def _select(domain: str, candidates: list[_Candidate], config: CorpusConfig, hashes: _FileHashes):
    """Documents taken in order until the size cap, and the candidates left out on the way."""
    cap = math.inf if config.max_mb_per_domain is None else config.max_mb_per_domain * MB
    limit = math.inf if config.max_doc_kb is None else config.max_doc_kb * 1000
    used, rejected, texts, seen, size = [], [], [], set(), 0
    for candidate in candidates:
        if size >= cap:
            break
        data, file_sha = hashes.read(candidate.source)
        entry = {"id": candidate.id, "source": str(candidate.source), "sha256": file_sha}
        try:
            text = candidate.extract(data)
        except _Rejected as reason:
            rejected.append({**entry, "reason": str(reason)})
            continue
        encoded = text.encode("utf-8")
        digest = hashlib.sha256(encoded).hexdigest()
        if not text.strip() or digest in seen:
            rejected.append({**entry, "reason": "duplicate" if text.strip() else "empty"})
            continue
        seen.add(digest)
        if len(encoded) > limit:
            entry["truncated_from"] = len(encoded)
            cut = encoded.rfind(b"\n", 0, int(limit)) + 1 or int(limit)
            encoded = encoded[:cut]
            text = encoded.decode("utf-8", errors="ignore")  # a cut inside a character drops that character
        used.append({**entry, "bytes": len(encoded)})
        texts.append(text)
        size += len(encoded)
    return used, rejected, texts


def _unit_hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15


def assign_splits(domain: str, ids: list[str], config: CorpusConfig) -> list[str]:
    """Split of each document id: by a hash of ``domain:id``, then val/test topped up to ``min_eval_docs``."""
    position = [_unit_hash(f"split:{domain}:{doc_id}") for doc_id in ids]
    cut_val, cut_test = config.val_fraction, config.val_fraction + config.test_fraction
    splits = ["val" if u < cut_val else "test" if u < cut_test else "train" for u in position]
    for split in ("val", "test"):
        missing = config.min_eval_docs - splits.count(split)
        if missing > 0:
            train = sorted((position[i], i) for i, s in enumerate(splits) if s == "train")
            for _, i in train[:missing]:
                splits[i] = split
    return splits


def _plan_domain(
    domain: str, root: str, candidates: list[_Candidate], config: CorpusConfig, hashes: _FileHashes
) -> tuple[dict, list[str]]:
    used, rejected, texts = _select(domain, candidates, config, hashes)
    size = sum(doc["bytes"] for doc in used)
    entry = {
        "root": root,
        "candidates": len(candidates),
        "candidates_sha256": _listing_hash(candidates),
        "documents": used,
        "rejected": rejected,
        "bytes": size,
    }
    fewest = 2 * config.min_eval_docs + 1
    if size < config.min_mb_per_domain * MB or len(used) < fewest:
        entry["excluded"] = (
            f"{len(used)} documents, {size / MB:.2f} MB of text; needs >= {fewest} documents and >= "
            f"{config.min_mb_per_domain} MB"
        )
        return entry, []
    for doc, split in zip(used, assign_splits(domain, [doc["id"] for doc in used], config), strict=True):
        doc["split"] = split
    return entry, texts


def _is_reusable(outdir: Path, manifest: dict, expected: dict, listings: dict[str, list[_Candidate]]) -> bool:
    """Whether ``manifest`` records what building ``listings`` would produce now, and it is on disk."""
    try:
        return _matches(outdir, manifest, expected, listings)
    except (KeyError, TypeError, AttributeError):  # a hand-edited or older manifest: rebuild
        return False


def _matches(outdir: Path, manifest: dict, expected: dict, listings: dict[str, list[_Candidate]]) -> bool:
    if {key: manifest.get(key) for key in expected} != expected or set(manifest["domains"]) != set(listings):
        return False
    hashes = _FileHashes()
    for domain, candidates in listings.items():
        entry = manifest["domains"][domain]
        if entry.get("candidates_sha256") != _listing_hash(candidates):
            return False
        for doc in entry["documents"] + entry["rejected"]:
            source = Path(doc["source"])
            if not source.is_file() or hashes.sha256(source) != doc["sha256"]:
                return False
        if "excluded" in entry:
            continue
        for split, counts in entry["splits"].items():
            meta = read_dataset_meta(outdir / domain / split)
            if meta is None or (meta.num_docs, meta.num_tokens) != (counts["num_docs"], counts["num_tokens"]):
                return False
    return True


def _build(
    outdir: str | Path,
    listings: dict[str, list[_Candidate]],
    roots: dict[str, str],
    config: CorpusConfig,
    *,
    builder: str,
    required: bool,
    force: bool,
    progress: bool,
) -> dict:
    outdir = Path(outdir)
    expected = {
        "kind": MANIFEST_KIND,
        "builder": builder,
        "builder_version": BUILDER_VERSION,
        "config": config.to_dict(),
    }
    manifest_file = outdir / MANIFEST_FILE
    if manifest_file.is_file():
        try:
            previous = json.loads(manifest_file.read_text())
        except json.JSONDecodeError:
            previous = {}
        if not force and _is_reusable(outdir, previous, expected, listings):
            return {**previous, "reused": True}
    elif outdir.exists() and any(outdir.iterdir()):
        raise ConfigError(
            f"`outdir` {outdir} exists, is not empty and holds no {MANIFEST_FILE}, so it is not a tikmix "
            f"corpus; choose a new or empty directory."
        )
    tokenizer = load_tokenizer(config.tokenizer)
    started = time.perf_counter()
    hashes = _FileHashes()
    manifest = {**expected, "python": sys.version.split()[0], "domains": {}}
    with atomic_directory(outdir, overwrite=True) as temp:
        for domain, candidates in tqdm(listings.items(), desc="corpus", unit="domain", disable=not progress):
            entry, texts = _plan_domain(domain, roots[domain], candidates, config, hashes)
            manifest["domains"][domain] = entry
            if "excluded" in entry:
                if required:
                    raise ConversionError(
                        f"domain {domain!r} at {roots[domain]}: too little text ({entry['excluded']}); add "
                        f"text, lower --min-eval-docs or drop the domain."
                    )
                continue
            entry["splits"] = {}
            for split in SPLITS:
                chosen = [
                    (doc, text)
                    for doc, text in zip(entry["documents"], texts, strict=True)
                    if doc["split"] == split
                ]
                split_texts = [text for _, text in chosen]
                labels = None
                if split == "train" and config.inject_noise:
                    split_texts, labels = inject_noise(
                        split_texts,
                        config.inject_noise,
                        config.kinds_of_noise,
                        seed=config.noise_seed,
                        domain=domain,
                    )
                sources = {
                    doc["source"]: {
                        "path": doc["source"],
                        "sha256": doc["sha256"],
                        "bytes": Path(doc["source"]).stat().st_size,
                    }
                    for doc, _ in chosen
                }
                meta = write_dataset(
                    temp / domain / split,
                    (tokenizer.encode(text) for text in split_texts),
                    name=f"{domain}/{split}",
                    format=config.format,
                    tokenizer=tokenizer,
                    sources=list(sources.values()),
                )
                entry["splits"][split] = {"num_docs": meta.num_docs, "num_tokens": meta.num_tokens}
                if labels is not None:
                    entry["noise"] = _save_noise_labels(temp / domain / split, labels, meta.num_docs)
        if not any("splits" in entry for entry in manifest["domains"].values()):
            raise ConversionError(
                f"corpus {outdir}: no domain has enough text "
                f"({ {name: entry.get('excluded') for name, entry in manifest['domains'].items()} }); "
                f"lower --min-mb-per-domain or add text."
            )
        if config.inject_noise:
            manifest["noise_kinds"] = list(NOISE_KINDS)
        manifest["build_seconds"] = round(time.perf_counter() - started, 2)
        (temp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return {**manifest, "reused": False}


def _save_noise_labels(directory: Path, labels: np.ndarray, num_docs: int) -> dict:
    """Store the noise label of every train document; returns the per-kind counts for the manifest."""
    if len(labels) != num_docs:  # a document that encodes to no tokens is dropped, which would shift labels
        raise ConversionError(
            f"{directory}: {num_docs} documents were stored but {len(labels)} were written with noise "
            f"labels; a document encoded to no tokens. Use another tokenizer or leave out --inject-noise."
        )
    np.save(directory / NOISE_LABELS_FILE, labels)
    counts = np.bincount(labels, minlength=len(NOISE_KINDS) + 1)
    return {"clean": int(counts[0]), **{kind: int(counts[k + 1]) for k, kind in enumerate(NOISE_KINDS)}}


def noise_labels(outdir: str | Path, domain: str) -> np.ndarray:
    """Noise label of each train document of ``domain`` (0 clean, ``k`` = ``NOISE_KINDS[k-1]``), int8."""
    file = Path(outdir) / domain / "train" / NOISE_LABELS_FILE
    try:
        return np.load(file)
    except OSError as exc:
        raise ConfigError(
            f"{file}: no noise labels for domain {domain!r} ({exc}); build the corpus with --inject-noise."
        ) from exc


def build_corpus(
    outdir: str | Path, config: CorpusConfig | None = None, *, force: bool = False, progress: bool = True
) -> dict:
    """Build (or reuse) the built-in corpus in ``outdir``; see the module docstring.

    Args:
        outdir (str | Path): Corpus directory; created, or reused/replaced when it holds a corpus.
        config (CorpusConfig, optional): Options. Default: ``CorpusConfig()`` (4 MB per domain, MDS, bytes).
        force (bool): Rebuild even when the manifest shows the corpus is up to date. Default: ``False``.
        progress (bool): Show a tqdm bar over domains. Default: ``True``.

    Returns:
        dict: The manifest, plus ``"reused": True`` when nothing was rebuilt.
    """
    config = config or CorpusConfig()
    roots = _builtin_roots(config)
    listings = {
        name: collect(config) if Path(roots[name]).is_dir() else []
        for name, collect in BUILTIN_DOMAINS.items()
    }
    return _build(
        outdir, listings, roots, config, builder="builtin", required=False, force=force, progress=progress
    )


def corpus_from_text(
    outdir: str | Path,
    domains: Mapping[str, str | Path],
    config: CorpusConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Build (or reuse) a corpus in ``outdir`` from directories of raw UTF-8 text, one document per file.

    Args:
        outdir (str | Path): Corpus directory, as in ``build_corpus``.
        domains (Mapping[str, str | Path]): Domain name to a directory (searched recursively) or file.
        config (CorpusConfig, optional): Options. Default: no size caps and no minimum size.
        force (bool): Rebuild even when up to date. Default: ``False``.
        progress (bool): Show a tqdm bar over domains. Default: ``True``.

    Returns:
        dict: The manifest, plus ``"reused"``.
    """
    config = config or CorpusConfig(max_mb_per_domain=None, min_mb_per_domain=0.0, max_doc_kb=None)
    if not domains:
        raise ConfigError("no domains given; pass --domain NAME=PATH at least once.")
    roots, listings = {}, {}
    for name, path in domains.items():
        if not _DOMAIN_NAME.match(name):
            raise ConfigError(
                f"domain name {name!r} must be letters, digits, '_', '-' or '.' (it names a folder)."
            )
        roots[name] = str(Path(path).resolve())
        listings[name] = _collect_text_dir(name, Path(path))
    return _build(
        outdir, listings, roots, config, builder="from-text", required=True, force=force, progress=progress
    )


def corpus_paths(outdir: str | Path, split: str = "train") -> dict[str, Path]:
    """Dataset directory of ``split`` for every domain the corpus in ``outdir`` holds, in manifest order."""
    if split not in SPLITS:
        raise ConfigError(f"`split` must be one of {SPLITS}, got {split!r}.")
    manifest_file = Path(outdir) / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{manifest_file}: no readable corpus manifest ({exc}); run `tikmix corpus build`."
        ) from exc
    return {
        name: Path(outdir) / name / split for name, entry in manifest["domains"].items() if "splits" in entry
    }


def load_corpus(outdir: str | Path, split: str = "train", **domain_options) -> list[Domain]:
    """One ``Domain`` per corpus domain for ``split``; ``domain_options`` go to every ``Domain``."""
    return [Domain(name, path, **domain_options) for name, path in corpus_paths(outdir, split).items()]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tikmix corpus build`` and ``tikmix corpus from-text``."""
    parser = subparsers.add_parser(
        "corpus",
        help="build the built-in multi-domain corpus, or one from text dirs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="corpus_command", required=True, metavar="SUBCOMMAND")
    build = commands.add_parser("build", help="the built-in corpus from stdlib, man pages, headers, docs")
    from_text = commands.add_parser("from-text", help="the same layout from directories of raw text")
    from_text.add_argument(
        "--domain",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a domain and its directory of text files (repeat for each domain)",
    )
    defaults = CorpusConfig()
    text_defaults = CorpusConfig(max_mb_per_domain=None, min_mb_per_domain=0.0, max_doc_kb=None)
    for command, preset in ((build, defaults), (from_text, text_defaults)):
        command.add_argument("outdir", metavar="OUTDIR", help="corpus directory")
        for option, kind in (
            ("max_mb_per_domain", _optional_float),
            ("min_mb_per_domain", float),
            ("max_doc_kb", _optional_float),
            ("val_fraction", float),
            ("test_fraction", float),
            ("min_eval_docs", int),
            ("format", str),
            ("tokenizer", str),
            ("inject_noise", float),
            ("noise_kinds", str),
            ("noise_seed", int),
        ):
            help_text = CorpusConfig.__dataclass_fields__[option].metadata["help"]
            command.add_argument(
                f"--{option.replace('_', '-')}",
                type=kind,
                default=getattr(preset, option),
                help=f"{help_text} (default: {getattr(preset, option)})",
            )
        command.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
        command.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        command.set_defaults(func=_run)


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _run(args: argparse.Namespace) -> int:
    names = (
        "max_mb_per_domain",
        "min_mb_per_domain",
        "max_doc_kb",
        "val_fraction",
        "test_fraction",
        "min_eval_docs",
        "format",
        "tokenizer",
        "inject_noise",
        "noise_kinds",
        "noise_seed",
    )
    config = CorpusConfig(**{name: getattr(args, name) for name in names})
    options = {"force": args.force, "progress": not args.no_progress}
    if args.corpus_command == "build":
        manifest = build_corpus(args.outdir, config, **options)
    else:
        domains = {}
        for item in args.domain:
            name, separator, path = item.partition("=")
            if not separator or not name or not path:
                raise ConfigError(f"--domain {item!r}: expected NAME=PATH.")
            path = os.path.expanduser(path)  # `NAME=~/dir`: sh and zsh leave a `~` after `=` as it is
            if name in domains:
                raise ConfigError(f"--domain {name!r} given twice ({domains[name]}, {path}); give it once.")
            domains[name] = path
        manifest = corpus_from_text(args.outdir, domains, config, **options)
    print(format_summary(args.outdir, manifest))
    return 0


def format_summary(outdir: str | Path, manifest: dict) -> str:
    """A few lines on what a build produced (or reused)."""
    state = "reused" if manifest.get("reused") else f"built in {manifest.get('build_seconds', 0):.1f}s"
    lines = [f"corpus {outdir} ({state}):"]
    for name, entry in manifest["domains"].items():
        if "excluded" in entry:
            lines.append(f"  {name:<10} left out: {entry['excluded']}")
            continue
        splits = ", ".join(
            f"{split} {c['num_docs']} docs / {c['num_tokens']:,} tokens"
            for split, c in entry["splits"].items()
        )
        lines.append(f"  {name:<10} {splits}; {len(entry['rejected'])} candidates left out")
        if "noise" in entry:
            lines.append(f"  {'':<10} train noise: {entry['noise']}")
    return "\n".join(lines)
