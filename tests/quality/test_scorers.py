"""Built-in scorers on crafted documents, the Kneser-Ney model against a direct count-based computation,
``tikmix score`` end to end, user scores, and bad input naming the argument."""

from __future__ import annotations

import random
import re
import zlib
from collections import Counter

import numpy as np
import pytest
from testkit.formats import make_domain_files, write_hf_tokenizer

from tikmix_loader.cli import main
from tikmix_loader.data.convert import convert
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.noise import boilerplate, char_noise, fragment, shuffled_words
from tikmix_loader.data.tokenizer import ByteTokenizer
from tikmix_loader.errors import ConfigError, ScoreError
from tikmix_loader.quality import read_scores, scorers
from tikmix_loader.quality.scorers import (
    DEFAULT_CRITERIA,
    KneserNeyLM,
    compression_scores,
    import_scores,
    line_scores,
    reference_texts,
    repetition_scores,
    score_dataset,
    score_texts,
    word_scores,
)

SENTENCES = [
    "The loader reads each domain from its own queue of documents.",
    "A weight controller measures how much every domain helps the target loss.",
    "Documents are packed into windows, and every token is predicted once.",
    "The mixture changes at a step boundary and is recorded in the ledger.",
    "Quality scores are stored beside the data as one number per document.",
    "The sampler keeps the best documents and repeats them in later epochs.",
    "Each rank reads only the samples of its own slice of the global batch.",
    "A state dictionary lets a fresh loader continue exactly where it stopped.",
]


def prose(seed: int) -> str:
    """The sentences in a random order, two per line (no sentence twice)."""
    order = random.Random(seed).sample(SENTENCES, len(SENTENCES))
    return "\n".join(" ".join(order[i : i + 2]) for i in range(0, len(order), 2)) + "\n"


@pytest.fixture(scope="module")
def model():
    return KneserNeyLM([prose(seed) for seed in range(40)])


def kneser_ney(docs: list[str], u: str, v: str, w: str, d: float = 0.75) -> float:
    """Interpolated Kneser-Ney P(w | u v), straight from the textbook definition with Counters."""
    padded = [["<s>", "<s>", *doc.split(), "</s>"] for doc in docs]
    trigrams = Counter(tuple(s[i - 2 : i + 1]) for s in padded for i in range(2, len(s)))
    bigrams = Counter((b, c) for (_, b, c) in trigrams)  # continuation counts: distinct left words
    unigrams = Counter(c for (_, c) in bigrams)
    size = len({word for s in padded for word in s[2:-1]}) + 3  # + unknown, <s>, </s>
    total = sum(unigrams.values())
    p = max(unigrams[w] - d, 0) / total + d * len(unigrams) / total / size
    after_v = {c: n for (b, c), n in bigrams.items() if b == v}
    if after_v:
        p = (max(after_v.get(w, 0) - d, 0) + d * len(after_v) * p) / sum(after_v.values())
    after_uv = {c: n for (a, b, c), n in trigrams.items() if (a, b) == (u, v)}
    if after_uv:
        p = (max(after_uv.get(w, 0) - d, 0) + d * len(after_uv) * p) / sum(after_uv.values())
    return p


def test_kneser_ney_matches_the_count_definition_and_normalises():
    docs = ["a b c a b d", "b c a b c", "d d a"]
    lm = KneserNeyLM(docs)
    ids = {**lm.vocab, "<s>": lm.BOS, "</s>": lm.EOS, "zzz": lm.UNK}
    for u, v, w in [
        ("a", "b", "c"),
        ("a", "b", "d"),
        ("<s>", "<s>", "a"),
        ("b", "c", "zzz"),
        ("d", "a", "b"),
    ]:
        key = (ids[u] * lm.size + ids[v]) * lm.size + ids[w]
        expected = kneser_ney(docs, u, v, "<unk>" if w == "zzz" else w)
        assert np.exp(lm.word_log_probs(np.array([key]))[0]) == pytest.approx(expected, rel=1e-12)
    for context in [("a", "b"), ("c", "c"), ("<s>", "<s>")]:  # seen, unseen, start: each sums to 1
        keys = (ids[context[0]] * lm.size + ids[context[1]]) * lm.size + np.arange(lm.size)
        assert np.exp(lm.word_log_probs(keys)).sum() == pytest.approx(1.0, rel=1e-12)


def test_reference_scores_see_shuffled_words_and_character_noise(model):
    rng = np.random.default_rng(0)
    originals = [prose(100 + i) for i in range(10)]
    shuffled = [shuffled_words(text, rng) for text in originals]
    noisy = [char_noise(text, rng) for text in originals]
    scores = {
        kind: score_texts(texts, ["ref_ppl", "word_order"], reference=model)
        for kind, texts in (("clean", originals), ("shuffled", shuffled), ("noisy", noisy))
    }
    for kind in ("shuffled", "noisy"):
        for name in ("ref_ppl", "word_order"):
            assert (scores[kind][name] > scores["clean"][name]).all(), (kind, name)
    assert (scores["shuffled"]["word_order"] > 0.5).all() and (scores["clean"]["word_order"] < 0.2).all()


def test_repetition_sees_boilerplate_and_matches_direct_counts():
    rng = np.random.default_rng(1)
    originals = [prose(200 + i) for i in range(5)]
    copies = [boilerplate(text, rng) for text in originals]
    assert (repetition_scores(copies) > 2 * repetition_scores(originals).max()).all()
    text = "x y z x y w\nx y z x y w\nend"
    # Direct counts: 2 of 3 lines are distinct (1 duplicate: 1/3 of lines, 11/27 of characters); one
    # paragraph. 13 words, 15 word characters. Most frequent 2-gram "x y": 4 x 2 characters; 3-grams: each
    # at most twice (2 x 3); 4-grams "x y z x" twice (2 x 4). Duplicate 5-grams: those at words 6 and 7
    # repeat those at 0 and 1, covering words 6..11 (6 characters); the 6-gram at 6 repeats the one at 0
    # (words 6..11); no 7- to 10-gram repeats.
    parts = [0, 0, 1 / 3, 11 / 27, 8 / 15, 6 / 15, 8 / 15, 6 / 15, 6 / 15, 0, 0, 0, 0]
    thresholds = [0.3, 0.2, 0.3, 0.2, 0.2, 0.18, 0.16, 0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    expected = np.mean(np.divide(parts, thresholds))
    assert repetition_scores([text, "a b c"])[0] == pytest.approx(expected)


def test_word_line_and_compression_rules():
    rng = np.random.default_rng(2)
    text = prose(300)
    assert word_scores([char_noise(text, rng)])[0] > word_scores([text])[0]
    no_stop_words = "Loader queue documents weight controller domain target loss.\n"
    assert word_scores([no_stop_words])[0] > word_scores([text])[0]
    # 3 non-empty lines: "Intro." (short, punctuated), "- item one" (short, bullet, unpunctuated) and a long
    # punctuated one: shares 1/3 unpunctuated, 2/3 short, 1/3 bullets; complete, then cut after "one".
    lines = "Intro.\n- item one\nThis line is long enough to count as a full sentence.\n"
    assert line_scores([lines])[0] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3) / 3)
    assert line_scores([lines[:17]])[0] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3 + 1)
    fragments = [fragment(prose(400 + i), rng) for i in range(10)]
    assert line_scores(fragments).min() >= 1 > line_scores([prose(400 + i) for i in range(10)]).max()
    assert compression_scores([char_noise(text, rng)])[0] > 1.2 * compression_scores([text])[0]
    assert compression_scores([text])[0] == len(zlib.compress(text.encode(), 6)) / len(text.encode())


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(3)
    texts = [prose(500 + i) for i in range(12)] + [boilerplate(prose(600), rng)]
    tokenizer = ByteTokenizer()
    path = make_domain_files(tmp_path, "parquet", [tokenizer.encode(t) for t in texts], name="web")
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(10):
        (reference / f"{i}.txt").write_text(prose(i))
    return path, reference, texts


def test_score_dataset_writes_every_criterion_like_score_texts(dataset, monkeypatch):
    path, reference, texts = dataset
    monkeypatch.setattr(scorers, "CHUNK_DOCS", 2)  # 7 chunks, at most 4 in flight on 2 processes, in order
    written = score_dataset(path, reference=[reference], workers=2, progress=False)
    assert sorted(written) == sorted(DEFAULT_CRITERIA)
    stored = read_scores(Domain("web", path), DEFAULT_CRITERIA)
    expected = score_texts(texts, list(DEFAULT_CRITERIA), reference=KneserNeyLM(reference_texts([reference])))
    for name in DEFAULT_CRITERIA:
        np.testing.assert_allclose(stored[name], expected[name].astype(np.float32), rtol=1e-6)
    assert stored["repetition"].argmax() == len(texts) - 1  # the boilerplate document


def test_cli_scores_and_imports_user_scores(dataset, tmp_path, capsys):
    path, reference, texts = dataset
    assert main(["score", str(path), "--scorer", "lines,compression", "--no-progress"]) == 0
    assert "lines ->" in capsys.readouterr().out
    domain = Domain("web", path)
    np.testing.assert_allclose(read_scores(domain, ["lines"])["lines"], line_scores(texts).astype(np.float32))
    values = np.arange(len(texts), dtype=np.float64) / 10
    (tmp_path / "scores.txt").write_text("\n".join(map(str, values)) + "\n")
    np.save(tmp_path / "scores.npy", values)
    argv = ["score", str(path), "--from-file", str(tmp_path / "scores.txt"), "--name", "classifier"]
    assert main([*argv, "--higher-is-better"]) == 0
    np.testing.assert_allclose(read_scores(domain, ["classifier"])["classifier"], -values.astype(np.float32))
    assert main(["score", str(path), "--from-file", str(tmp_path / "scores.npy"), "--name", "clf2"]) == 0
    np.testing.assert_allclose(read_scores(domain, ["clf2"])["clf2"], values.astype(np.float32))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scorer", "bogus"], r"`--scorer` \['bogus'\].*choose among"),
        (["--scorer", "ref_ppl"], "need `--reference PATH`"),
        (["--scorer", "ref_ppl", "--reference", "/no/such/dir"], r"`--reference` /no/such/dir"),
        (["--from-file", "FILE"], "`--from-file` needs `--name NAME`"),
        (["--name", "x"], "go with `--from-file`"),
        (["--workers", "0", "--scorer", "lines"], "`--workers` must be >= 1"),
    ],
)
def test_bad_arguments_are_named(dataset, args, message, capsys):
    path = dataset[0]
    assert main(["score", str(path), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_unconverted_text_is_refused_with_the_formats_recognised_not_a_format_argument(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("Plain text, never converted.\n")
    assert main(["score", str(tmp_path), "--scorer", "lines"]) == 2
    error = capsys.readouterr().err
    assert re.search(
        r"cannot tell the format \(expected an MDS directory.*tokenized with `tikmix convert`", error
    )
    assert "format=" not in error  # `tikmix score` has no such flag


def test_bad_user_score_files_are_refused_without_writing(dataset, tmp_path):
    path, _, texts = dataset
    (tmp_path / "short.txt").write_text("1\n2\n")
    (tmp_path / "words.txt").write_text("high\nlow\n")
    np.save(tmp_path / "nan.npy", np.full(len(texts), np.nan))
    for name, message in [
        ("short.txt", "2 values but .* 13 documents"),
        ("words.txt", "one number per line"),
        ("nan.npy", "NaN or infinite"),
        ("absent.npy", "not a .npy"),
    ]:
        with pytest.raises(ScoreError, match=f"`--from-file` .*{name}.*{message}"):
            import_scores(path, tmp_path / name, "user")
    assert not (path / "quality" / "user.npy").exists()
    with pytest.raises(ConfigError, match="--scorer"):
        score_dataset(path, ["lines", "nope"], progress=False)


def test_scores_decode_with_the_datasets_own_tokenizer(tmp_path):
    texts = [prose(700 + i) for i in range(6)] + ["- cut in the midd"]
    folder = tmp_path / "text"
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"{i}.txt").write_text(text)
    tokenizer = write_hf_tokenizer(tmp_path / "tokenizer.json")
    convert([folder], tmp_path / "hf", name="hf", format="memmap", tokenizer=tokenizer, progress=False)
    score_dataset(tmp_path / "hf", ["lines", "repetition"], progress=False)
    stored = read_scores(Domain("hf", tmp_path / "hf"), ["lines", "repetition"])
    np.testing.assert_allclose(stored["lines"], line_scores(texts).astype(np.float32))
    np.testing.assert_allclose(stored["repetition"], repetition_scores(texts).astype(np.float32), rtol=1e-6)
    untagged = make_domain_files(tmp_path, "memmap", [[1, 2, 3]], name="untagged", metadata=False)
    with pytest.raises(ConfigError, match="no tikmix.json .* pass `--tokenizer`"):
        score_dataset(untagged, ["lines"], progress=False)
    assert score_dataset(untagged, ["lines"], tokenizer="bytes", progress=False)["lines"].is_file()
