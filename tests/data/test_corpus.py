"""``tikmix corpus``: the built-in and from-text corpora, their splits, manifest, reuse and failures."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json

import pytest

from tikmix_loader import ConfigError, ConversionError, Domain
from tikmix_loader.data import corpus as corpus_module
from tikmix_loader.data.corpus import (
    SPLITS,
    CorpusConfig,
    assign_splits,
    build_corpus,
    corpus_from_text,
    corpus_paths,
    load_corpus,
)
from tikmix_loader.data.tokenizer import ByteTokenizer

TROFF = (
    ".TH {name} 1\n.SH NAME\n{name} \\- does {name} things\n.SH DESCRIPTION\n" + "Some prose. " * 40 + "\n"
)


@pytest.fixture
def system(tmp_path):
    """Fake man, include and doc trees so the optional domains are built the same on every machine."""
    man, include, doc = tmp_path / "man", tmp_path / "include", tmp_path / "doc"
    for name in ("ls", "cp", "mv", "rm"):
        (man / "man1").mkdir(parents=True, exist_ok=True)
        (man / "man1" / f"{name}.1.gz").write_bytes(gzip.compress(TROFF.format(name=name).encode()))
    (man / "de" / "man1").mkdir(parents=True)
    (man / "de" / "man1" / "ls.1.gz").write_bytes(gzip.compress(b".TH LS 1\nDeutsch"))
    (man / "man1" / "broken.1.gz").write_bytes(b"not gzip at all")
    (include / "sys").mkdir(parents=True)
    for index in range(4):
        (include / "sys" / f"h{index}.h").write_text(
            f"#define VALUE_{index} {index}\n" + "int f(void);\n" * 30
        )
    (include / "copy.h").write_text((include / "sys" / "h0.h").read_text())  # exact duplicate
    (doc / "pkg").mkdir(parents=True)
    for index in range(4):
        (doc / "pkg" / f"README{index}.md").write_text(
            f"# Package {index}\n" + "This package does things. " * 30
        )
    (doc / "pkg" / "changelog.gz").write_bytes(gzip.compress(b"pkg (1.0) stable; urgency=low\n  * First.\n"))
    (doc / "pkg" / "README.bin").write_bytes(b"\0\1\2 binary")
    (doc / "pkg" / "logo.png").write_bytes(b"\x89PNG not prose")
    return {"man_dir": str(man), "include_dir": str(include), "doc_dir": str(doc)}


def tiny_config(system, **overrides):
    options = dict(max_mb_per_domain=0.02, min_mb_per_domain=0.0005, max_doc_kb=4, min_eval_docs=1)
    return CorpusConfig(**{**options, **system, **overrides})


def decode_all(path):
    domain = Domain("d", path)
    return [ByteTokenizer().decode(doc) for doc in domain.read_docs(0, domain.num_docs)]


def test_build_layout_manifest_and_splits(tmp_path, system):
    out = tmp_path / "corpus"
    manifest = build_corpus(out, tiny_config(system), progress=False)
    assert manifest["reused"] is False
    assert list(corpus_paths(out)) == ["code", "docs", "man", "c_headers", "prose"]
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["config"] == tiny_config(system).to_dict()
    for name, entry in saved["domains"].items():
        documents = entry["documents"]
        assert len({doc["id"] for doc in documents}) == len(documents)
        assert entry["bytes"] <= 0.02e6 + 4000  # the cap, overshot by at most one document
        for split in SPLITS:
            chosen = [doc for doc in documents if doc["split"] == split]
            assert len(chosen) >= 1
            domain = Domain(name, out / name / split)
            assert domain.num_docs == len(chosen) == entry["splits"][split]["num_docs"]
            assert domain.num_tokens == sum(doc["bytes"] for doc in chosen)  # bytes tokenizer: 1 token/byte
        for doc in documents:
            assert doc["sha256"] == hashlib.sha256(open(doc["source"], "rb").read()).hexdigest()
            assert doc["bytes"] <= 4000
    docs_ids = [doc["id"] for doc in saved["domains"]["docs"]["documents"]]
    assert docs_ids[0].startswith("pydoc_topics/")
    man = saved["domains"]["man"]
    assert not any("de/" in doc["id"] for doc in man["documents"] + man["rejected"])
    assert {"id": "man1/broken.1.gz", "reason": "bad gzip"}.items() <= next(
        r for r in man["rejected"] if r["id"] == "man1/broken.1.gz"
    ).items()
    rejected = {r["id"]: r["reason"] for entry in saved["domains"].values() for r in entry["rejected"]}
    assert rejected.get("copy.h") == "duplicate" or rejected.get("sys/h0.h") == "duplicate"
    assert rejected["pkg/README.bin"] == "binary"
    assert "pkg/logo.png" not in rejected
    man_texts = [text for split in SPLITS for text in decode_all(out / "man" / split)]
    assert sorted(text.split()[1] for text in man_texts) == ["cp", "ls", "mv", "rm"]
    assert [domain.name for domain in load_corpus(out, "val")] == list(corpus_paths(out))


def test_second_build_reuses_until_inputs_or_options_change(tmp_path, system, monkeypatch):
    out = tmp_path / "corpus"
    config = tiny_config(system)
    build_corpus(out, config, progress=False)
    real_write = corpus_module.write_dataset
    monkeypatch.setattr(
        corpus_module, "write_dataset", lambda *a, **k: pytest.fail("rebuilt an unchanged corpus")
    )
    assert build_corpus(out, config, progress=False)["reused"] is True
    monkeypatch.setattr(corpus_module, "write_dataset", real_write)
    assert build_corpus(out, config, force=True, progress=False)["reused"] is False
    assert build_corpus(out, tiny_config(system, val_fraction=0.2), progress=False)["reused"] is False
    readme = tmp_path / "doc" / "pkg" / "README2.md"
    readme.write_text(readme.read_text() + " Edited.")
    rebuilt = build_corpus(out, tiny_config(system, val_fraction=0.2), progress=False)
    assert rebuilt["reused"] is False
    assert any(doc["id"] == "pkg/README2.md" for doc in rebuilt["domains"]["prose"]["documents"])
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []


def test_absent_or_small_domains_are_left_out(tmp_path, system):
    config = tiny_config(system, man_dir=str(tmp_path / "no-man"), min_mb_per_domain=0.0025)
    manifest = build_corpus(tmp_path / "corpus", config, progress=False)
    assert "0 documents" in manifest["domains"]["man"]["excluded"]
    assert "needs >= 3 documents and >= 0.0025 MB" in manifest["domains"]["c_headers"]["excluded"]
    assert list(corpus_paths(tmp_path / "corpus")) == ["code", "docs", "prose"]
    assert not (tmp_path / "corpus" / "man").exists()


def test_builtin_corpus_on_this_machine(tmp_path):
    manifest = build_corpus(
        tmp_path / "c",
        CorpusConfig(max_mb_per_domain=0.01, max_doc_kb=2, min_mb_per_domain=0.001),
        progress=False,
    )
    assert {"code", "docs"} <= set(corpus_paths(tmp_path / "c"))
    code = decode_all(tmp_path / "c" / "code" / "train")
    assert any("import " in text or "def " in text for text in code)
    assert manifest["python"]


def test_assign_splits_is_deterministic_and_stable():
    config = CorpusConfig(val_fraction=0.1, test_fraction=0.1, min_eval_docs=1)
    ids = [f"file{i}.txt" for i in range(400)]
    splits = assign_splits("d", ids, config)
    assert splits == assign_splits("d", ids, config)
    assert 20 <= splits.count("val") <= 60 and 20 <= splits.count("test") <= 60
    more = assign_splits("d", ids + [f"new{i}.txt" for i in range(100)], config)
    assert more[:400] == splits  # adding documents never moves existing ones
    assert assign_splits("other", ids, config) != splits  # the domain is part of the key
    few = assign_splits("d", ["a", "b", "c", "d", "e"], CorpusConfig(min_eval_docs=2))
    assert few.count("val") == 2 and few.count("test") == 2 and few.count("train") == 1


def test_from_text(tmp_path):
    for name in ("poems", "recipes"):
        (tmp_path / name / "nested").mkdir(parents=True)
        for index in range(6):
            (tmp_path / name / "nested" / f"{index}.txt").write_text(f"{name} number {index}\n")
    out = tmp_path / "corpus"
    manifest = corpus_from_text(
        out, {"poems": tmp_path / "poems", "recipes": tmp_path / "recipes"}, progress=False
    )
    assert list(corpus_paths(out, "test")) == ["poems", "recipes"]
    texts = sorted(text for split in SPLITS for text in decode_all(out / "recipes" / split))
    assert texts == [f"recipes number {index}\n" for index in range(6)]
    assert manifest["builder"] == "from-text" and manifest["config"]["max_mb_per_domain"] is None
    assert (
        corpus_from_text(out, {"poems": tmp_path / "poems", "recipes": tmp_path / "recipes"}, progress=False)[
            "reused"
        ]
        is True
    )


def test_from_text_bad_inputs(tmp_path):
    (tmp_path / "few").mkdir()
    (tmp_path / "few" / "one.txt").write_text("only one document")
    with pytest.raises(ConversionError, match=r"domain 'few' at .*few: too little text \(1 documents"):
        corpus_from_text(tmp_path / "c", {"few": tmp_path / "few"}, progress=False)
    (tmp_path / "few" / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ConversionError, match=r"domain 'few': .*bad.txt is not UTF-8 text"):
        corpus_from_text(tmp_path / "c", {"few": tmp_path / "few"}, progress=False)
    with pytest.raises(ConversionError, match=r"input .*missing: no such file or directory"):
        corpus_from_text(tmp_path / "c", {"x": tmp_path / "missing"}, progress=False)
    with pytest.raises(ConfigError, match=r"domain name 'a/b' must be letters"):
        corpus_from_text(tmp_path / "c", {"a/b": tmp_path / "few"}, progress=False)
    with pytest.raises(ConfigError, match=r"no domains given"):
        corpus_from_text(tmp_path / "c", {}, progress=False)
    assert not (tmp_path / "c").exists()


def test_outdir_that_is_not_a_corpus(tmp_path, system):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(
        ConfigError, match=r"`outdir` .*taken exists, is not empty and holds no manifest.json"
    ):
        build_corpus(tmp_path / "taken", tiny_config(system), progress=False)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_failed_build_leaves_nothing(tmp_path, system, monkeypatch):
    real_write = corpus_module.write_dataset
    calls = []

    def write_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(corpus_module, "write_dataset", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(tmp_path / "corpus", tiny_config(system), progress=False)
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc", "include", "man"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_mb_per_domain": 0}, r"`max_mb_per_domain` must be > 0 or None"),
        ({"max_doc_kb": -1}, r"`max_doc_kb` must be > 0 or None"),
        ({"min_mb_per_domain": -1}, r"`min_mb_per_domain` must be >= 0"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"must be >= 0 and sum to < 1"),
        ({"min_eval_docs": 0}, r"`min_eval_docs` must be >= 1"),
        ({"format": "csv"}, r"`format` 'csv' is not one of"),
    ],
)
def test_config_validation(options, message):
    with pytest.raises(ConfigError, match=message):
        CorpusConfig(**options)


def test_corpus_paths_needs_a_manifest(tmp_path):
    with pytest.raises(ConfigError, match=r"manifest.json: no readable corpus manifest.*tikmix corpus build"):
        corpus_paths(tmp_path)
    with pytest.raises(ConfigError, match=r"`split` must be one of"):
        corpus_paths(tmp_path, "dev")


def test_cli(tmp_path, system, capsys):
    parser = argparse.ArgumentParser()
    corpus_module.register(parser.add_subparsers(dest="command"))
    flags = [
        "--max-mb-per-domain",
        "0.02",
        "--min-mb-per-domain",
        "0.0005",
        "--max-doc-kb",
        "4",
        "--min-eval-docs",
        "1",
        "--format",
        "parquet",
        "--no-progress",
    ]
    args = parser.parse_args(["corpus", "build", str(tmp_path / "c"), *flags])
    assert args.func(args) == 0
    assert "code" in capsys.readouterr().out
    assert (tmp_path / "c" / "code" / "train" / "part-00000.parquet").is_file()
    (tmp_path / "t").mkdir()
    for index in range(3):
        (tmp_path / "t" / f"{index}.txt").write_text(f"text {index}")
    args = parser.parse_args(
        [
            "corpus",
            "from-text",
            str(tmp_path / "ft"),
            "--domain",
            f"t={tmp_path / 't'}",
            "--min-eval-docs",
            "1",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    assert "built in" in capsys.readouterr().out
    args = parser.parse_args(["corpus", "from-text", str(tmp_path / "ft"), "--domain", "oops"])
    with pytest.raises(ConfigError, match=r"--domain 'oops': expected NAME=PATH"):
        args.func(args)


def test_cli_from_text_domains(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    corpus_module.register(parser.add_subparsers(dest="command"))
    for folder in ("t", "u"):
        (tmp_path / folder).mkdir()
        for index in range(3):
            (tmp_path / folder / f"{index}.txt").write_text(f"{folder} text {index}")
    monkeypatch.setenv("HOME", str(tmp_path))
    command = ["corpus", "from-text", str(tmp_path / "ft"), "--min-eval-docs", "1", "--no-progress"]
    args = parser.parse_args([*command, "--domain", "t=~/t"])  # as sh and zsh pass it: `~` unexpanded
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert {name: entry["root"] for name, entry in manifest["domains"].items()} == {"t": str(tmp_path / "t")}
    args = parser.parse_args([*command, "--domain", "t=~/t", "--domain", "t=~/u"])
    with pytest.raises(ConfigError, match=r"--domain 't' given twice \(.*/t, .*/u\); give it once"):
        args.func(args)


@pytest.mark.parametrize("content", ["{broken", '{"kind": "tikmix-corpus"}', '{"domains": {"code": 1}}'])
def test_damaged_manifest_means_rebuild(tmp_path, system, content):
    out = tmp_path / "corpus"
    config = tiny_config(system)
    build_corpus(out, config, progress=False)
    (out / "manifest.json").write_text(content)
    assert build_corpus(out, config, progress=False)["reused"] is False
    assert json.loads((out / "manifest.json").read_text())["kind"] == "tikmix-corpus"
