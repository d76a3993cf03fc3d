"""Injected noise: rates and kinds as asked, each kind a damaged copy of a real document, determinism, and
``tikmix corpus --inject-noise`` touching only train splits."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from testkit.corpus import make_text_corpus

from tikmix_loader import ConfigError, Domain
from tikmix_loader.cli import main
from tikmix_loader.data.corpus import SPLITS, CorpusConfig, corpus_from_text, corpus_paths, noise_labels
from tikmix_loader.data.noise import NOISE_KINDS, inject_noise
from tikmix_loader.data.tokenizer import ByteTokenizer

CLEAN = [
    f"Line one of document {i} ends here.\nThe second line of it has more words, {i} of them.\n" * (1 + i % 3)
    for i in range(60)
]


def test_rate_kinds_and_order_of_originals():
    texts, labels = inject_noise(CLEAN, 0.2, seed=3, domain="web")
    assert len(texts) == len(labels) == 75  # 15 noisy are 20% of 75
    assert labels.dtype == np.int8
    assert Counter(labels.tolist()) == {0: 60, 1: 4, 2: 4, 3: 4, 4: 3}  # 15 split over 4 kinds, first first
    assert [t for t, label in zip(texts, labels, strict=True) if label == 0] == CLEAN
    assert 0 < np.flatnonzero(labels)[0] and np.flatnonzero(labels)[-1] > 30  # spread, not appended
    only, only_labels = inject_noise(CLEAN, 0.5, ["fragment", "char_noise"], seed=0, domain="web")
    assert Counter(only_labels.tolist()) == {0: 60, 2: 30, 4: 30}


def test_each_kind_is_a_damaged_copy_of_a_real_document():
    texts, labels = inject_noise(CLEAN, 0.4, seed=1, domain="web")
    for text, label in zip(texts, labels, strict=True):
        kind = NOISE_KINDS[label - 1] if label else "clean"
        if kind == "shuffled_words":
            source = next(c for c in CLEAN if sorted(c.split()) == sorted(text.split()))
            assert text != source and [len(line) > 0 for line in text.split("\n")] == [
                len(line) > 0 for line in source.split("\n")
            ]
        elif kind == "char_noise":
            same_length = [c for c in CLEAN if len(c) == len(text)]
            source = min(same_length, key=lambda c: sum(a != b for a, b in zip(text, c, strict=True)))
            non_space = sum(not c.isspace() for c in source)
            changed = sum(a != b for a, b in zip(text, source, strict=True)) / non_space
            assert 0.1 < changed < 0.4  # about a quarter of the non-space characters redrawn
            assert [i for i, c in enumerate(text) if c.isspace()] == [
                i for i, c in enumerate(source) if c.isspace()
            ]
        elif kind == "boilerplate":
            lines = text.splitlines()
            assert len(set(lines)) == 1 and len(lines) >= 3 and any(lines[0] in c for c in CLEAN)
        elif kind == "fragment":
            source = next(c for c in CLEAN if c.startswith(text))
            assert 16 <= len(text) < 0.31 * len(source) + 16 and not text[-1].isspace()


def test_deterministic_in_seed_and_domain():
    first = inject_noise(CLEAN, 0.2, seed=5, domain="web")
    again = inject_noise(CLEAN, 0.2, seed=5, domain="web")
    assert first[0] == again[0] and np.array_equal(first[1], again[1])
    assert inject_noise(CLEAN, 0.2, seed=6, domain="web")[0] != first[0]
    assert inject_noise(CLEAN, 0.2, seed=5, domain="code")[0] != first[0]
    assert inject_noise(CLEAN, 0.0)[0] == CLEAN


@pytest.mark.parametrize(
    ("rate", "kinds", "message"),
    [(1.0, (), "inject_noise"), (-0.1, (), "inject_noise"), (0.2, ["spam"], r"noise_kinds.*'spam'")],
)
def test_bad_options_name_the_argument(rate, kinds, message):
    with pytest.raises(ConfigError, match=message):
        inject_noise(CLEAN, rate, kinds)
    with pytest.raises(ConfigError, match=message):
        CorpusConfig(inject_noise=rate, noise_kinds=",".join(kinds))


def decode_all(path):
    domain = Domain("d", path)
    return [ByteTokenizer().decode(doc) for doc in domain.read_docs(0, domain.num_docs)]


def test_corpus_injects_into_train_only_and_records_labels(tmp_path):
    clean = make_text_corpus(tmp_path / "a")  # 10 documents per domain, one or two of them in val/test
    text_dirs = {name: tmp_path / "a" / "text" / name for name in ("prose", "numbers", "code")}
    noisy = tmp_path / "noisy"
    config = CorpusConfig(
        max_mb_per_domain=None, min_mb_per_domain=0.0, max_doc_kb=None, inject_noise=0.5, noise_seed=1
    )
    manifest = corpus_from_text(noisy, text_dirs, config, progress=False)
    assert manifest["noise_kinds"] == list(NOISE_KINDS)
    assert json.loads((noisy / "manifest.json").read_text())["config"]["inject_noise"] == 0.5
    for name in corpus_paths(noisy):
        for split in ("val", "test"):
            assert decode_all(noisy / name / split) == decode_all(clean / name / split)
            assert not (noisy / name / split / "noise_labels.npy").exists()
        labels = noise_labels(noisy, name)
        train, clean_train = decode_all(noisy / name / "train"), decode_all(clean / name / "train")
        assert len(train) == len(labels) == 2 * len(clean_train)
        assert [t for t, label in zip(train, labels, strict=True) if label == 0] == clean_train
        counts = manifest["domains"][name]["noise"]
        assert counts["clean"] == len(clean_train) and sum(counts.values()) == len(labels)
        assert [counts[kind] for kind in NOISE_KINDS] == np.bincount(labels, minlength=5)[1:].tolist()
    assert "inject_noise" not in json.loads((clean / "manifest.json").read_text())["config"]


def test_cli_inject_noise_and_missing_labels(tmp_path, capsys):
    make_text_corpus(tmp_path / "a")
    domains = [f"--domain={name}={tmp_path / 'a' / 'text' / name}" for name in ("prose", "code")]
    out = tmp_path / "noisy"
    argv = [
        "corpus",
        "from-text",
        str(out),
        *domains,
        "--inject-noise",
        "0.25",
        "--noise-kinds",
        "boilerplate",
    ]
    assert main([*argv, "--no-progress"]) == 0
    assert "train noise" in capsys.readouterr().out
    assert set(np.unique(noise_labels(out, "prose"))) == {0, NOISE_KINDS.index("boilerplate") + 1}
    with pytest.raises(ConfigError, match="'numbers'.*--inject-noise"):
        noise_labels(tmp_path / "a" / "corpus", "numbers")
    assert SPLITS[0] == "train"
