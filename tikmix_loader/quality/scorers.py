"""Built-in quality scorers and ``tikmix score``: one score per document, written with ``write_scores``.

Every built-in score is oriented so that **lower is better** (``DEFAULT_CRITERIA``); the scorers see the
decoded text of each document (the dataset's own tokenizer, named in its ``tikmix.json``, decodes it):

===============  ========================================================================================
criterion        what it measures
===============  ========================================================================================
``ref_ppl``      perplexity per whitespace word under a word trigram model with interpolated Kneser-Ney
                 smoothing fitted on a reference set the user names (``--reference``), as in CCNet
``word_order``   that perplexity over the same model's unigram perplexity: how little the two preceding
                 words help predict the next (about 1 for words in random order)
``repetition``   Gopher repetition: duplicate lines/paragraphs, top 2-4-gram and duplicate 5-10-gram
                 character fractions, each divided by Gopher's filter threshold, averaged
``words``        Gopher word rules: symbols per word, words without a letter, lack of stop words, word
                 length outside 3..10 characters, each divided by its filter threshold, averaged
``lines``        C4/FineWeb line rules: shares of lines not ending in punctuation, of short lines and of
                 bullet lines, averaged, plus 1 when the text stops in the middle of a line (truncated)
``compression``  zlib-compressed size / raw size of the UTF-8 text (random characters compress badly)
===============  ========================================================================================

A user score (a classifier's, say) is imported with ``tikmix score PATH --from-file FILE --name NAME``.

Why not ``datatrove``'s filters: they answer keep/drop per document, while QuaDMix needs graded scores to
rank documents; they need ``nltk`` for word splitting and ``huggingface-hub>=1.6``, which conflicts with the
``transformers`` pin of the lock. The rules are re-implemented here with their published thresholds, and
the n-gram ones vectorised over many documents at once with NumPy. Why a hand-written n-gram model: KenLM
(what CCNet uses) needs a C++ build and its ``lmplz`` trainer is not on PyPI, and ``nltk.lm`` scores one
n-gram per Python call, far too slow for a corpus. See ``docs/quadmix.md``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tikmix_loader.data.convert import expand_inputs, read_texts
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.metadata import read_dataset_meta
from tikmix_loader.data.tokenizer import Tokenizer, load_tokenizer
from tikmix_loader.errors import ConfigError, DomainError, ScoreError, UnknownFormatError
from tikmix_loader.quality.scores import check_criterion_name, write_scores

DEFAULT_CRITERIA = {
    "ref_ppl": "lower",
    "word_order": "lower",
    "repetition": "lower",
    "words": "lower",
    "lines": "lower",
    "compression": "lower",
}
REFERENCE_CRITERIA = frozenset({"ref_ppl", "word_order"})
CHUNK_DOCS = 64
_NEEDS_REFERENCE = (
    "scorers 'ref_ppl' and 'word_order' need `--reference PATH` (a converted dataset or text), e.g. a val "
    "split; or leave them out with `--scorer`."
)
_PARAGRAPH = re.compile(r"\n{2,}")
_LINE = re.compile(r"\n+")
# Gopher (Rae et al. 2021, table A1) and its common stop words; FineWeb's short-line length.
GOPHER_TOP_NGRAM = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAM = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
STOP_WORDS = frozenset(
    "the be to of and that have with a an in is it for on as at by this not or are from was".split()
)
SHORT_LINE_CHARS = 30
HASH_BASE = 1_000_003
TERMINAL_PUNCTUATION = tuple(".!?\"')")
BULLETS = ("-", "*", "•", "‣", "–", "+")


# ------------------------------------------------------------------------------------------- ref_ppl
class KneserNeyLM:
    """A word trigram model with interpolated Kneser-Ney smoothing (one discount), held in NumPy arrays.

    Each n-gram of word ids is packed into one int64 key (``vocab_size`` is capped so that three ids fit),
    counted with ``np.unique`` and looked up with ``np.searchsorted``, so fitting and scoring are
    vectorised over whole corpora. Words unseen in the reference map to one unknown id, whose probability
    is the model's uniform floor: a document of damaged words gets a high perplexity.

    Args:
        texts (Iterable[str]): The reference documents; words are split on whitespace.
        discount (float): The Kneser-Ney discount ``D``. Default: ``0.75``.
        max_vocab (int): Most frequent words kept (the rest are unknown). Default: ``2_000_000``.
    """

    UNK, BOS, EOS = 0, 1, 2

    def __init__(self, texts: Iterable[str], *, discount: float = 0.75, max_vocab: int = 2_000_000):
        documents = [text.split() for text in texts]
        counts = Counter(word for words in documents for word in words)
        if not counts:
            raise ScoreError("`--reference`: the reference set holds no words; name a non-empty text set.")
        kept = [word for word, _ in counts.most_common(max_vocab)]
        self.vocab = {word: index + 3 for index, word in enumerate(kept)}
        self.size = len(self.vocab) + 3
        self.discount = discount
        keys = self._trigram_keys(documents)[0]
        self.trigrams, self.trigram_counts = np.unique(keys, return_counts=True)
        # Contexts (u, v): total count and number of distinct continuations.
        self.contexts, inverse = np.unique(self.trigrams // self.size, return_inverse=True)
        self.context_totals = np.bincount(inverse, weights=self.trigram_counts)
        self.context_types = np.bincount(inverse).astype(np.float64)
        # Bigrams (v, w) by continuation count: how many distinct u precede them.
        self.bigrams, self.bigram_counts = np.unique(self.trigrams % self.size**2, return_counts=True)
        self.heads, inverse = np.unique(self.bigrams // self.size, return_inverse=True)
        self.head_totals = np.bincount(inverse, weights=self.bigram_counts)
        self.head_types = np.bincount(inverse).astype(np.float64)
        # Unigrams by continuation count, interpolated with the uniform distribution over the vocabulary.
        words, word_counts = np.unique(self.bigrams % self.size, return_counts=True)
        continuation = np.zeros(self.size)
        continuation[words] = word_counts
        total = continuation.sum()
        self.unigram = (
            np.maximum(continuation - discount, 0) / total + discount * len(words) / total / self.size
        )

    def _trigram_keys(self, documents: Sequence[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Key of every trigram ending at each word or end of document, and the document of each."""
        vocab, size = self.vocab, self.size
        ids, owners = [], []
        for index, words in enumerate(documents):
            ids.append([self.BOS, self.BOS, *(vocab.get(word, self.UNK) for word in words), self.EOS])
            owners.append(np.full(len(words) + 1, index))
        flat = np.fromiter((i for doc in ids for i in doc), dtype=np.int64)
        starts = np.cumsum([0] + [len(doc) for doc in ids])[:-1]
        targets = np.ones(len(flat), dtype=bool)
        targets[starts] = targets[starts + 1] = False  # the two <s> of each document predict nothing
        positions = np.flatnonzero(targets)
        keys = (flat[positions - 2] * size + flat[positions - 1]) * size + flat[positions]
        return keys, np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)

    def word_log_probs(self, keys: np.ndarray) -> np.ndarray:
        """Natural log-probability of the last word of each trigram key."""
        size, d = self.size, self.discount
        p = self.unigram[keys % size]
        found, index = _lookup(self.heads, keys // size % size)
        bigram_found, bigram_index = _lookup(self.bigrams, keys % size**2)
        count = np.where(bigram_found, self.bigram_counts[bigram_index], 0)
        total, types = self.head_totals[index[found]], self.head_types[index[found]]
        p[found] = (np.maximum(count[found] - d, 0) + d * types * p[found]) / total
        found, index = _lookup(self.contexts, keys // size)
        trigram_found, trigram_index = _lookup(self.trigrams, keys)
        count = np.where(trigram_found, self.trigram_counts[trigram_index], 0)
        total, types = self.context_totals[index[found]], self.context_types[index[found]]
        p[found] = (np.maximum(count[found] - d, 0) + d * types * p[found]) / total
        return np.log(p)

    def perplexities(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """``ref_ppl`` and ``word_order`` of each text (the end of a document counts as one word).

        ``ref_ppl`` is the per-word perplexity; ``word_order`` divides it by the perplexity of the same
        words under the model's unigram distribution, i.e. ``exp`` of minus the mean log-gain that the two
        preceding words give: near 1 when context does not help (words in random order), lower when it
        does. Unknown words cost the same in both, so rare vocabulary does not hide the word order.
        """
        documents = [text.split() for text in texts]
        keys, owners = self._trigram_keys(documents)
        log_probs = self.word_log_probs(keys)
        gains = log_probs - np.log(self.unigram[keys % self.size])
        words = np.array([len(words) + 1 for words in documents])
        return {
            "ref_ppl": np.exp(-np.bincount(owners, log_probs, minlength=len(texts)) / words),
            "word_order": np.exp(-np.bincount(owners, gains, minlength=len(texts)) / words),
        }


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether each query is in ``sorted_keys``, and its index there (clipped when absent)."""
    index = np.minimum(np.searchsorted(sorted_keys, queries), max(len(sorted_keys) - 1, 0))
    found = sorted_keys[index] == queries if len(sorted_keys) else np.zeros(len(queries), dtype=bool)
    return found, index


# ---------------------------------------------------------------------------------------- heuristics
def repetition_scores(texts: Sequence[str]) -> np.ndarray:
    """Gopher repetition per text: each duplicate fraction over its filter threshold, averaged.

    The line and paragraph parts count duplicated lines (paragraphs) and their characters; the n-gram
    parts take the characters of the most frequent 2-, 3- and 4-gram, and of the words covered by any
    repeated occurrence of a 5- to 10-gram (Gopher skips ahead past a repeat; covering is its vectorised
    equivalent up to overlaps). 1.0 means "at Gopher's cut-off on average".
    """
    parts = [_line_repetition(text) for text in texts]
    ngram = _ngram_repetition(texts)
    thresholds = np.array([0.30, 0.20, 0.30, 0.20] + list(GOPHER_TOP_NGRAM.values()))
    thresholds = np.concatenate([thresholds, list(GOPHER_DUP_NGRAM.values())])
    return (np.concatenate([np.array(parts).reshape(len(texts), 4), ngram], axis=1) / thresholds).mean(axis=1)


def _line_repetition(text: str) -> list[float]:
    size = max(len(text), 1)
    result = []
    for pieces in (_PARAGRAPH.split(text.strip()), _LINE.split(text)):
        counts = Counter(pieces)
        duplicates = sum(c - 1 for c in counts.values())
        duplicate_chars = sum((c - 1) * len(piece) for piece, c in counts.items())
        result += [duplicates / max(len(pieces), 1), duplicate_chars / size]
    return result


def _ngram_repetition(texts: Sequence[str]) -> np.ndarray:
    """Top 2-4-gram and duplicate 5-10-gram character fractions of each text, ``[len(texts), 9]``."""
    documents = [text.split() for text in texts]
    owner = np.repeat(np.arange(len(texts)), [len(words) for words in documents])
    ids: dict[str, int] = {}
    word_ids = np.array(
        [ids.setdefault(word, len(ids)) for words in documents for word in words], dtype=np.uint64
    )
    lengths = np.array([len(word) for words in documents for word in words], dtype=np.float64)
    chars = np.maximum(np.bincount(owner, weights=lengths, minlength=len(texts)), 1)
    result = np.zeros((len(texts), len(GOPHER_TOP_NGRAM) + len(GOPHER_DUP_NGRAM)))
    # keys[i]: a polynomial hash (wrapping uint64) of the text of word i and words i .. i+n-1; spans[i]: their
    # characters. Both grow by one word per n, so all n cost one pass each.
    keys, spans = owner.astype(np.uint64) * np.uint64(HASH_BASE) + word_ids, lengths
    columns = {n: column for column, n in enumerate([*GOPHER_TOP_NGRAM, *GOPHER_DUP_NGRAM])}
    for n in range(1, max(columns) + 1):
        if n > 1:
            with np.errstate(over="ignore"):
                keys = keys[:-1] * np.uint64(HASH_BASE) + word_ids[n - 1 :]
            spans = spans[:-1] + lengths[n - 1 :]
        if n not in columns or len(keys) == 0:
            continue
        starts = np.flatnonzero(owner[: len(keys)] == owner[n - 1 :])  # n-grams inside one text
        _, first, inverse, counts = np.unique(
            keys[starts], return_index=True, return_inverse=True, return_counts=True
        )
        if n in GOPHER_TOP_NGRAM:
            top = np.zeros(len(texts))
            np.maximum.at(top, owner[starts[first]], counts * spans[starts[first]])
            result[:, columns[n]] = top / chars
        else:
            repeats = starts[first[inverse] != np.arange(len(starts))]
            edges = np.bincount(repeats, minlength=len(owner) + 1)
            edges -= np.bincount(repeats + n, minlength=len(owner) + 1)
            covered = np.cumsum(edges[:-1]) > 0
            words = np.bincount(owner[covered], weights=lengths[covered], minlength=len(texts))
            result[:, columns[n]] = words / chars
    return result


def word_scores(texts: Sequence[str]) -> np.ndarray:
    """Gopher word rules per text, each over its threshold, averaged (1.0: at the cut-offs on average).

    Parts: symbols (ASCII punctuation other than ``.,;:!?'"()-``) per word (Gopher: ``#`` and ellipses per
    word, 0.1); share of words without a letter (0.2); lack of stop words, ``1 - share / 0.3``; and how far
    the mean word length falls outside Gopher's 3..10 characters.
    """
    result = np.zeros(len(texts))
    for index, text in enumerate(texts):
        words = text.split()
        if not words:
            result[index] = 4.0
            continue
        symbols = sum(text.count(c) for c in "#$%&*+/<=>@[\\]^_`{|}~")
        no_letter = sum(not any(c.isalpha() for c in word) for word in words)
        stop = sum(word.lower() in STOP_WORDS for word in words)
        mean_length = sum(map(len, words)) / len(words)
        result[index] = (
            symbols / len(words) / 0.1
            + no_letter / len(words) / 0.2
            + max(0.0, 1 - stop / len(words) / 0.3)
            + max(0.0, 3 - mean_length) / 3
            + max(0.0, mean_length - 10) / 10
        ) / 4
    return result


def line_scores(texts: Sequence[str]) -> np.ndarray:
    """C4/FineWeb line rules per text: the mean share of non-empty lines not ending in punctuation, of lines
    shorter than ``SHORT_LINE_CHARS`` and of bullet lines, plus 1 when the text ends in mid-line (no line
    end and no closing punctuation), so a truncated text ranks below every complete one."""
    result = np.zeros(len(texts))
    for index, text in enumerate(texts):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            result[index] = 2.0
            continue
        unpunctuated = sum(not line.endswith(TERMINAL_PUNCTUATION) for line in lines)
        short = sum(len(line) < SHORT_LINE_CHARS for line in lines)
        bullets = sum(line.startswith(BULLETS) for line in lines)
        cut = not text.endswith("\n") and not text.rstrip().endswith(TERMINAL_PUNCTUATION)
        result[index] = (unpunctuated + short + bullets) / len(lines) / 3 + cut
    return result


def compression_scores(texts: Sequence[str]) -> np.ndarray:
    """zlib (level 6) compressed size over raw size of each text's UTF-8 bytes."""
    raw = [text.encode("utf-8") for text in texts]
    return np.array([len(zlib.compress(data, 6)) / max(len(data), 1) for data in raw])


SCORERS = {
    "repetition": repetition_scores,
    "words": word_scores,
    "lines": line_scores,
    "compression": compression_scores,
}


def score_texts(texts: Sequence[str], criteria: Sequence[str], *, reference: KneserNeyLM | None = None):
    """Score of each text for each criterion, ``{name: float64 [len(texts)]}``."""
    scores = {}
    if REFERENCE_CRITERIA.intersection(criteria):
        if reference is None:
            raise ConfigError(
                f"criteria {sorted(REFERENCE_CRITERIA)} need a reference model; pass `--reference PATH`."
            )
        scores.update(reference.perplexities(texts))
    for name in criteria:
        if name not in scores:
            scores[name] = SCORERS[name](texts)
    return {name: scores[name] for name in criteria}


# ------------------------------------------------------------------------------------ reading text
def check_criteria(criteria: Sequence[str]) -> list[str]:
    """``criteria`` as a list, or ``ConfigError`` naming ``--scorer`` and the known names."""
    criteria = list(dict.fromkeys(criteria))
    unknown = [name for name in criteria if name not in DEFAULT_CRITERIA]
    if unknown or not criteria:
        raise ConfigError(
            f"`--scorer` {unknown or criteria}: unknown scorer; choose among {list(DEFAULT_CRITERIA)}."
        )
    return criteria


def _open_dataset(path: str | os.PathLike) -> Domain:
    """The converted dataset at ``path``, its format sniffed: scoring takes no ``format=``, so an unknown one
    is reported with the formats recognised and no advice to pass one."""
    try:
        return Domain(str(path), path)
    except UnknownFormatError as error:
        raise DomainError(error.unrecognised) from None


def dataset_tokenizer(path: str | os.PathLike, tokenizer: str | None = None) -> Tokenizer:
    """The tokenizer that made the dataset at ``path`` (from ``tikmix.json``) or the one named."""
    if tokenizer is None:
        meta = read_dataset_meta(path)
        if meta is None:
            raise ConfigError(
                f"{path}: no tikmix.json names the tokenizer that made its ids; pass `--tokenizer` "
                f"('bytes' or a tokenizer.json)."
            )
        tokenizer = meta.tokenizer.removeprefix("hf:")
    return load_tokenizer(tokenizer)


def iter_texts(domain: Domain, tokenizer: Tokenizer, *, progress: bool = False):
    """Decoded texts of ``domain``'s documents in storage order, in lists of ``CHUNK_DOCS``."""
    bar = tqdm(total=domain.num_docs, desc=f"score {domain.name}", unit="doc", disable=not progress)
    for start in range(0, domain.num_docs, CHUNK_DOCS):
        stop = min(start + CHUNK_DOCS, domain.num_docs)
        yield [tokenizer.decode(ids) for ids in domain.read_docs(start, stop)]
        bar.update(stop - start)
    bar.close()


def reference_texts(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Texts of the reference sets: converted datasets (decoded), else text files or directories of them."""
    texts = []
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"`--reference` {path}: no such file or directory.")
        if read_dataset_meta(path) is not None:
            for chunk in iter_texts(_open_dataset(path), dataset_tokenizer(path)):
                texts.extend(chunk)
        else:
            for file in expand_inputs([path]):
                texts.extend(text for text, _ in read_texts(file) if text is not None)
    return texts


# ------------------------------------------------------------------------------------------- scoring
_worker_state: dict = {}


def _start_worker(criteria, reference) -> None:
    _worker_state.update(criteria=criteria, reference=reference)


def _score_chunk(texts: list[str]) -> dict[str, np.ndarray]:
    return score_texts(texts, _worker_state["criteria"], reference=_worker_state["reference"])


def score_dataset(
    path: str | os.PathLike,
    criteria: Sequence[str] = tuple(DEFAULT_CRITERIA),
    *,
    reference: Sequence[str | os.PathLike] | KneserNeyLM | None = None,
    tokenizer: str | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Path]:
    """Compute the built-in ``criteria`` for every document of the dataset at ``path`` and store them.

    Args:
        path (str | PathLike): A converted dataset (MDS, Parquet or memmap).
        criteria (Sequence[str]): Names from ``DEFAULT_CRITERIA``. Default: all of them.
        reference (Sequence[path] | KneserNeyLM, optional): Reference sets (converted datasets or text) for
            ``ref_ppl``, or a model already fitted on them. Required when ``ref_ppl`` is asked for.
        tokenizer (str, optional): Decodes the ids; default: the one named in the dataset's ``tikmix.json``.
        workers (int): Processes scoring chunks of documents in parallel. Default: ``1``.
        progress (bool): Show a tqdm bar. Default: ``True``.

    Returns:
        dict[str, Path]: The score file written for each criterion.
    """
    criteria = check_criteria(criteria)
    if workers < 1:
        raise ConfigError(f"`--workers` must be >= 1, got {workers}.")
    model = None
    if REFERENCE_CRITERIA.intersection(criteria):
        if not reference:
            raise ConfigError(_NEEDS_REFERENCE)
        model = reference if isinstance(reference, KneserNeyLM) else KneserNeyLM(reference_texts(reference))
    domain = _open_dataset(path)
    chunks = iter_texts(domain, dataset_tokenizer(path, tokenizer), progress=progress)
    if workers == 1:
        results = [score_texts(chunk, criteria, reference=model) for chunk in chunks]
    else:
        with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(criteria, model)) as pool:
            results = list(_map_ahead(pool, chunks, ahead=2 * workers))
    return {
        name: write_scores(path, name, np.concatenate([r[name] for r in results]), num_docs=domain.num_docs)
        for name in criteria
    }


def _map_ahead(pool: ProcessPoolExecutor, chunks, *, ahead: int):
    """``_score_chunk`` of each chunk in order, with at most ``ahead`` chunks in flight.

    ``Executor.map`` would submit every chunk at once, i.e. hold the decoded text of the whole dataset.
    """
    pending = collections.deque()
    for chunk in chunks:
        pending.append(pool.submit(_score_chunk, chunk))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def import_scores(
    path: str | os.PathLike, file: str | os.PathLike, name: str, *, higher_is_better: bool = False
) -> Path:
    """Store a user's score of each document (``.npy``, or one number per line of a text/CSV file).

    With ``higher_is_better`` the values are stored negated, so that like every built-in criterion lower is
    better. Raises ``ScoreError`` naming ``--from-file`` when the file is unreadable or of the wrong length.
    """
    check_criterion_name(name)
    file = Path(file)
    try:
        if file.suffix == ".npy":
            values = np.load(file, allow_pickle=False)
        else:
            values = np.loadtxt(file, dtype=np.float64, delimiter="," if file.suffix == ".csv" else None)
    except (OSError, ValueError) as exc:
        raise ScoreError(f"`--from-file` {file}: not a .npy array or one number per line ({exc}).") from exc
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ScoreError(f"`--from-file` {file}: expected one value per document, got shape {values.shape}.")
    num_docs = _open_dataset(path).num_docs
    if len(values) != num_docs:
        raise ScoreError(
            f"`--from-file` {file}: {len(values)} values but {path} holds {num_docs} documents; give one "
            f"value per document in storage order."
        )
    try:
        return write_scores(path, name, -values if higher_is_better else values, num_docs=num_docs)
    except ScoreError as exc:
        raise ScoreError(f"`--from-file` {file}: {exc}") from None


# ------------------------------------------------------------------------------------------------ CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tikmix score``."""
    parser = subparsers.add_parser(
        "score",
        help="compute per-document quality scores of a converted dataset (or import your own)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="converted datasets to score")
    parser.add_argument(
        "--scorer",
        action="append",
        metavar="NAME",
        help=f"built-in scorer to run (repeat or comma-separate; default: all of {list(DEFAULT_CRITERIA)})",
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="PATH",
        help="reference set for ref_ppl: a converted dataset or text files/dirs (repeatable)",
    )
    parser.add_argument("--tokenizer", help="decode with this tokenizer instead of the dataset's own")
    parser.add_argument("--workers", type=int, default=1, help="processes scoring in parallel (default 1)")
    parser.add_argument("--from-file", metavar="FILE", help="import a user score (.npy or one per line)")
    parser.add_argument("--name", help="criterion name of the imported score (with --from-file)")
    parser.add_argument(
        "--higher-is-better", action="store_true", help="the imported score is better when higher"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.from_file is not None:
        if not args.name or args.scorer:
            raise ConfigError("`--from-file` needs `--name NAME` and takes no `--scorer`.")
        for path in args.paths:
            written = import_scores(path, args.from_file, args.name, higher_is_better=args.higher_is_better)
            print(f"{path}: {args.name} -> {written}" + (" (negated)" if args.higher_is_better else ""))
        return 0
    if args.name or args.higher_is_better:
        raise ConfigError("`--name` and `--higher-is-better` go with `--from-file`.")
    names = [name for item in args.scorer or DEFAULT_CRITERIA for name in item.split(",") if name]
    criteria = check_criteria(names)
    model = None
    if REFERENCE_CRITERIA.intersection(criteria):
        if not args.reference:
            raise ConfigError(_NEEDS_REFERENCE)
        model = KneserNeyLM(reference_texts(args.reference))
    for path in args.paths:
        written = score_dataset(
            path,
            criteria,
            reference=model,
            tokenizer=args.tokenizer,
            workers=args.workers,
            progress=not args.no_progress,
        )
        print(f"{path}: " + ", ".join(f"{name} -> {file}" for name, file in written.items()))
    return 0
