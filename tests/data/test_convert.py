"""``tikmix convert``: every input kind, every format, atomic output, and each bad input by name."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from testkit.formats import write_hf_tokenizer

from tikmix_loader import ConfigError, ConversionError, Domain
from tikmix_loader.cli import main
from tikmix_loader.data import convert as convert_module
from tikmix_loader.data.convert import FORMATS, convert, write_dataset
from tikmix_loader.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def inputs(tmp_path):
    """One input of each kind; documents in reading order are listed in ``inputs.expected``."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "a.txt").write_text("alpha document\n")
    (root / "sub" / "b.md").write_text("bravo ü document")
    (root / ".git" / "config").write_text("hidden, left out")
    (root / ".hidden.txt").write_text("hidden, left out")
    (root / "c.jsonl").write_text('{"text": "charlie one"}\n\n{"text": "charlie two", "id": 3}\n')
    (root / "d.txt.gz").write_bytes(gzip.compress(b"delta, gzipped"))
    (root / "e.txt").write_text("")  # an empty document: dropped and counted
    table = pa.table({"text": ["echo one", "echo two", "echo three"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=2)
    expected = [
        "alpha document\n",
        "charlie one",
        "charlie two",
        "delta, gzipped",
        "bravo ü document",
        "echo one",
        "echo two",
        "echo three",
    ]
    return [root, tmp_path / "f.parquet"], expected


def texts_of(domain):
    return [ByteTokenizer().decode(doc) for doc in domain.read_docs(0, domain.num_docs)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_input_kind_into_every_format(tmp_path, inputs, fmt):
    paths, expected = inputs
    meta = convert(paths, tmp_path / "out", name="mix", format=fmt, progress=False)
    domain = Domain("mix", tmp_path / "out")
    assert texts_of(domain) == expected
    assert (meta.num_docs, meta.empty_docs_dropped) == (8, 1)
    assert meta.num_tokens == sum(len(text.encode()) for text in expected) == domain.num_tokens
    saved = json.loads((tmp_path / "out" / "tikmix.json").read_text())
    assert saved["format"] == fmt and saved["tokenizer"] == "bytes" and saved["eos_id"] == 256
    recorded = {source["path"]: source for source in saved["sources"]}
    assert len(recorded) == 6  # hidden files are not inputs
    for path, source in recorded.items():
        assert source["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_compressed_mds_and_parquet(tmp_path, inputs):
    paths, expected = inputs
    for fmt in ("mds", "parquet"):
        convert(paths, tmp_path / fmt, name="z", format=fmt, compression="zstd", progress=False)
        assert texts_of(Domain("z", tmp_path / fmt)) == expected


def test_hf_tokenizer_ids_and_metadata(tmp_path, inputs):
    tokenizer_file = write_hf_tokenizer(tmp_path / "tokenizer.json")
    paths, expected = inputs
    meta = convert(paths, tmp_path / "out", name="hf", tokenizer=tokenizer_file, progress=False)
    domain = Domain("hf", tmp_path / "out")
    assert (domain.eos_id, domain.pad_id, domain.source.vocab_size) == (2, 1, meta.vocab_size)
    assert meta.tokenizer == f"hf:{tokenizer_file.resolve()}"
    assert meta.tokenizer_sha256 == hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    from tikmix_loader.data.tokenizer import load_tokenizer

    hf = load_tokenizer(tokenizer_file)
    assert [hf.decode(doc) for doc in domain.read_docs(0, domain.num_docs)] == expected


def _leftovers(parent):
    return sorted(path.name for path in parent.iterdir() if ".tmp-" in path.name or ".old-" in path.name)


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_conversion_leaves_nothing(tmp_path, inputs, monkeypatch, fmt, failure):
    calls = []

    def encode_then_fail(self, text):
        calls.append(text)
        if len(calls) == 4:
            raise failure
        return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16)

    monkeypatch.setattr(ByteTokenizer, "encode", encode_then_fail)
    with pytest.raises(type(failure)):
        convert(inputs[0], tmp_path / "out", name="x", format=fmt, progress=False)
    assert len(calls) == 4  # it failed midway, after writing documents
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_dataset(tmp_path, inputs, monkeypatch):
    paths, expected = inputs
    convert(paths, tmp_path / "out", name="x", progress=False)
    with pytest.raises(
        ConfigError, match=r"`output` .*out already exists; choose a new path or pass --overwrite"
    ):
        convert(paths, tmp_path / "out", name="x", progress=False)
    monkeypatch.setattr(ByteTokenizer, "encode", lambda self, text: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        convert(paths, tmp_path / "out", name="x", overwrite=True, progress=False)
    assert texts_of(Domain("x", tmp_path / "out")) == expected
    monkeypatch.undo()
    convert([paths[1]], tmp_path / "out", name="x", overwrite=True, progress=False)
    assert texts_of(Domain("x", tmp_path / "out")) == ["echo one", "echo two", "echo three"]
    assert _leftovers(tmp_path) == []


def test_output_may_be_an_empty_directory(tmp_path, inputs):
    (tmp_path / "out").mkdir()
    convert(inputs[0], tmp_path / "out", name="x", format="memmap", progress=False)
    assert Domain("x", tmp_path / "out").num_docs == 8


def test_encoding_errors(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(
        ConversionError, match=r"latin1.txt: not UTF-8 text \(bad byte at offset 3\).*replace"
    ):
        convert([tmp_path / "latin1.txt"], tmp_path / "out", name="x", progress=False)
    convert([tmp_path / "latin1.txt"], tmp_path / "out", name="x", encoding_errors="replace", progress=False)
    assert texts_of(Domain("x", tmp_path / "out")) == ["caf\ufffd"]
    with pytest.raises(ConfigError, match=r"`encoding_errors` must be one of"):
        convert([tmp_path / "latin1.txt"], tmp_path / "o2", name="x", encoding_errors="ignore")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"text": "ok"}\n{"body": "no text"}\n',
            r"bad.jsonl:2: no string field 'text' \(found \['body'\]\)",
        ),
        ('{"text": "ok"}\nnot json\n', r"bad.jsonl:2: not a JSON object"),
        ('["a list"]\n', r"bad.jsonl:1: no string field 'text' \(found list\)"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ConversionError, match=message):
        convert([tmp_path / "bad.jsonl"], tmp_path / "out", name="x", progress=False)
    assert not (tmp_path / "out").exists()


def test_jsonl_custom_text_column(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"body": "one"}\n{"body": "two"}\n')
    convert([tmp_path / "docs.jsonl"], tmp_path / "out", name="x", text_column="body", progress=False)
    assert texts_of(Domain("x", tmp_path / "out")) == ["one", "two"]


def test_bad_parquet_text(tmp_path):
    pq.write_table(pa.table({"body": ["a", None]}), tmp_path / "t.parquet")
    with pytest.raises(ConversionError, match=r"t.parquet: no string column 'text'.*--text-column"):
        convert([tmp_path / "t.parquet"], tmp_path / "out", name="x", progress=False)
    with pytest.raises(ConversionError, match=r"t.parquet \(row group 0, row 1\): 'body' is null"):
        convert([tmp_path / "t.parquet"], tmp_path / "out", name="x", text_column="body", progress=False)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConversionError, match=r"broken.parquet: not a readable Parquet file"):
        convert([tmp_path / "broken.parquet"], tmp_path / "out", name="x", progress=False)


def test_inputs_that_are_neither_files_nor_directories_say_what_they_are(tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to(tmp_path / "gone.txt")
    for item, kind in [
        (Path(os.devnull), "a character device"),
        (tmp_path / "pipe", "a named pipe"),
        (tmp_path / "link", r"a broken symbolic link \(to .*gone.txt\)"),
    ]:
        with pytest.raises(
            ConversionError,
            match=rf"input {re.escape(str(item))} is {kind}; inputs are text, JSONL or Parquet",
        ):
            convert([item], tmp_path / "out", name="x", progress=False)
    assert main(["convert", os.devnull, "--name", "x", "--output", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "is a character device" in error and "no such file" not in error


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(ConversionError, match=r"input .*nope.txt: no such file or directory"):
        convert([tmp_path / "nope.txt"], tmp_path / "out", name="x", progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConversionError, match=r"the directories hold no files"):
        convert([tmp_path / "empty_dir"], tmp_path / "out", name="x", progress=False)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ConversionError, match=r"x: no non-empty documents to write .*\(1 empty inputs\)"):
        convert([tmp_path / "blank.txt"], tmp_path / "out", name="x", progress=False)
    with pytest.raises(ConversionError, match=r"no inputs given"):
        convert([], tmp_path / "out", name="x", progress=False)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_bad_options(tmp_path, inputs):
    with pytest.raises(ConfigError, match=r"`format` 'csv' is not one of"):
        convert(inputs[0], tmp_path / "out", name="x", format="csv", progress=False)
    with pytest.raises(ConfigError, match=r"`compression` 'rar' is not one of streaming's"):
        convert(inputs[0], tmp_path / "out", name="x", compression="rar", progress=False)
    with pytest.raises(ConfigError, match=r"`compression` 'rar' is not an available Parquet codec"):
        convert(inputs[0], tmp_path / "out", name="x", format="parquet", compression="rar", progress=False)
    with pytest.raises(ConfigError, match=r"`compression` 'zstd' applies to mds and parquet only"):
        convert(inputs[0], tmp_path / "out", name="x", format="memmap", compression="zstd", progress=False)
    assert _leftovers(tmp_path) == []


def test_write_dataset_from_token_arrays(tmp_path):
    docs = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([255])]
    meta = write_dataset(tmp_path / "out", docs, name="arrays", format="parquet")
    assert (meta.num_docs, meta.num_tokens, meta.empty_docs_dropped) == (2, 4, 1)
    read = Domain("arrays", tmp_path / "out").read_docs(0, 2)
    assert [doc.tolist() for doc in read] == [[1, 2, 3], [255]]


def test_cli(tmp_path, inputs, capsys):
    parser = argparse.ArgumentParser()
    convert_module.register(parser.add_subparsers(dest="command"))
    paths, expected = inputs
    args = parser.parse_args(
        [
            "convert",
            "--name",
            "cli",
            "--output",
            str(tmp_path / "out"),
            "--format",
            "parquet",
            "--no-progress",
            *map(str, paths),
        ]
    )
    assert args.func(args) == 0
    assert "8 documents" in capsys.readouterr().out
    assert texts_of(Domain("cli", tmp_path / "out")) == expected


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750)])
def test_output_directory_follows_the_umask(tmp_path, inputs, umask, mode):
    previous = os.umask(umask)
    try:
        convert(inputs[0], tmp_path / "out", name="m", progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode


def test_convert_help_starts_without_torch():
    code = (
        "import sys\n"
        "from tikmix_loader.cli import main\n"
        "try:\n"
        "    main(['convert', '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print('torch' in sys.modules, 'streaming' in sys.modules)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "--workers" in result.stdout and "--max-doc-tokens" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "False False"


def _tree(directory):
    """Every file under ``directory`` with its bytes."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_workers_write_the_same_dataset_as_one_process(tmp_path, inputs, monkeypatch, fmt):
    tokenizer_file = write_hf_tokenizer(tmp_path / "tokenizer.json")  # a BPE tokenizer must pickle too
    monkeypatch.setattr(convert_module, "BATCH_BYTES", 16)  # several batches in flight on this small input
    options = {
        "name": "w",
        "format": fmt,
        "tokenizer": tokenizer_file,
        "progress": False,
        "max_doc_tokens": 3,
    }
    one = convert(inputs[0], tmp_path / "one", workers=1, **options)
    two = convert(inputs[0], tmp_path / "two", workers=2, **options)
    assert one == two and _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_max_doc_tokens_splits_long_documents(tmp_path):
    (tmp_path / "long.txt").write_text("abcdefghij")
    (tmp_path / "short.txt").write_text("xyz")
    meta = convert([tmp_path], tmp_path / "out", name="s", max_doc_tokens=4, progress=False)
    texts = texts_of(Domain("s", tmp_path / "out"))
    assert texts == ["abcd", "efgh", "ij", "xyz"]
    assert (meta.num_docs, meta.num_tokens, meta.docs_split, meta.max_doc_tokens) == (4, 13, 1, 4)
    with pytest.raises(ConfigError, match=r"`max_doc_tokens` must be >= 1 or None, got 0"):
        convert([tmp_path / "long.txt"], tmp_path / "bad", name="s", max_doc_tokens=0, progress=False)
    with pytest.raises(ConfigError, match=r"`workers` must be an int >= 1, got 0"):
        convert([tmp_path / "long.txt"], tmp_path / "bad", name="s", workers=0, progress=False)


@pytest.mark.parametrize("fmt", ["mds", "parquet"])
def test_converted_output_opens_without_reading_documents(tmp_path, inputs, monkeypatch, fmt):
    from tikmix_loader.data.sources import SOURCES

    convert(inputs[0], tmp_path / "out", name="o", format=fmt, progress=False)
    monkeypatch.setattr(SOURCES[fmt], "_scan_lengths", lambda self: pytest.fail("scanned a converted domain"))
    domain = Domain("o", tmp_path / "out")
    assert domain.num_tokens == sum(len(text.encode()) for text in inputs[1])
    assert texts_of(domain) == inputs[1]


def test_readme_data_chain_runs_as_written(tmp_path, monkeypatch):
    from tikmix_loader.cli import main

    text = (REPO / "README.md").read_text()
    chain = re.search(r"<!-- data-chain:start -->(.*?)<!-- data-chain:end -->", text, re.S)
    assert chain, "README.md lost its data-chain block"
    shell = re.search(r"```bash\n(.*?)```", chain.group(1), re.S).group(1)
    python = re.search(r"```python\n(.*?)```", chain.group(1), re.S).group(1)
    rng = np.random.default_rng(0)
    for domain in ("web", "code", "math"):
        (tmp_path / "texts" / domain).mkdir(parents=True)
        for index in range(12):
            words = rng.choice(["alpha", "beta", domain, "gamma", "delta"], size=40)
            (tmp_path / "texts" / domain / f"{index}.txt").write_text(" ".join(words))
    (tmp_path / "pages.jsonl").write_text('{"text": "a page"}\n{"text": "another page"}\n')
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line) for line in shell.splitlines() if line.strip()]
    assert [command[:2] for command in commands] == [["tikmix", "convert"]] * 3
    for command in commands:
        assert main(command[1:]) == 0
    namespace = {}
    exec(compile(python, "README.md", "exec"), namespace)
    assert namespace["batch"]["input_ids"].shape == (8, 64)
    assert namespace["remote_web"].source.cached_bytes <= 64 << 20
