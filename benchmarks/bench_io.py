"""I/O benchmark: `tikmix convert` on 1 vs 2 processes, first open with vs without the conversion index, and
shards fetched before the first read of a remote MDS domain, each against its baseline in the same run.

1. Convert: real text (this Python's standard library sources, one document per file, up to ``--megabytes``)
   tokenized with a byte-level BPE tokenizer trained on it (``tokenizers``, ``--vocab`` ids), written as
   MDS with ``workers=1`` (baseline) and ``workers=2``. Reported: input MB/s, median and p20/p80 over
   ``--repeats`` runs, and ``speedup = time(1 worker) / time(2 workers)``.
2. First open: ``Domain`` on an MDS directory of ``--open-docs`` random documents (1..511 tokens) written
   by ``write_mds`` with its length index (ours), and on a copy with the index removed so the lengths are
   scanned (baseline: what data written by other tools gets), each with an empty tikmix cache so nothing is
   reused. ``speedup = scan / index``.
3. Remote: the same documents in ``--shard-bytes`` shards, opened with ``remote=`` (a local directory stands
   in for object storage); reported: shards in the local cache after opening and after the first document
   is read, against the number of shards (which the previous implementation fetched at open).

Run: ``python benchmarks/bench_io.py`` or ``tikmix bench io``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np


def collect_text(directory: Path, megabytes: float) -> list[Path]:
    """Copy standard-library ``.py`` files into ``directory`` until ``megabytes`` of text are there."""
    budget = int(megabytes * 1e6)
    copied, total = [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if total >= budget:
            break
        target = directory / f"{len(copied):06d}.txt"
        try:
            target.write_text(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        copied.append(target)
        total += target.stat().st_size
    return copied


def train_tokenizer(files: list[Path], path: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<unk>", "<pad>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(file) for file in files[:200]], trainer)
    tokenizer.save(str(path))
    return path


def quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return statistics.median(values), at(0.2), at(0.8)


def timed(function, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def row(name: str, seconds: list[float], baseline: list[float], unit_per_second: float | None = None) -> str:
    median, p20, p80 = quantiles(seconds)
    rate = f"{unit_per_second / median:9.2f}" if unit_per_second else " " * 9
    return (
        f"{name:<34}{median:9.3f} {p20:9.3f} {p80:9.3f} {rate} {statistics.median(baseline) / median:8.2f}x"
    )


def run(args) -> None:
    from tikmix_loader import Domain
    from tikmix_loader.data.convert import convert
    from tikmix_loader.data.sources.mds import MDSSource, write_mds

    root = Path(tempfile.mkdtemp(prefix="tikmix-bench-io-"))
    previous_cache = os.environ.get("TIKMIX_CACHE_DIR")
    try:
        (root / "text").mkdir()
        files = collect_text(root / "text", args.megabytes)
        megabytes = sum(file.stat().st_size for file in files) / 1e6
        tokenizer = train_tokenizer(files, root / "tokenizer.json", args.vocab)
        print(f"# {platform.platform()}, {os.cpu_count()} CPUs; {len(files)} files, {megabytes:.1f} MB text")
        print(f"{'case':<34}{'median s':>9} {'p20':>9} {'p80':>9} {'MB/s':>9} {'speedup':>9}")

        # Untimed warm-up: imports (streaming's take seconds) and the page cache of the inputs.
        convert([root / "text"], root / "warm-up", name="bench", tokenizer=tokenizer, progress=False)
        runs = {"1": [], "2": []}
        for repeat in range(args.repeats):  # interleaved, so both settings see the same background load
            for workers in ("1", "2"):
                output = root / f"out-{workers}-{repeat}"
                start = time.perf_counter()
                convert(
                    [root / "text"],
                    output,
                    name="bench",
                    tokenizer=tokenizer,
                    workers=int(workers),
                    progress=False,
                )
                runs[workers].append(time.perf_counter() - start)
        print(row("convert, 1 worker (baseline)", runs["1"], runs["1"], megabytes))
        print(row("convert, 2 workers", runs["2"], runs["1"], megabytes))

        rng = np.random.default_rng(0)
        documents = [rng.integers(0, 258, size=int(n)) for n in rng.integers(1, 512, size=args.open_docs)]
        ids = {"eos_id": 256, "pad_id": 257, "vocab_size": 258}
        dataset = write_mds(root / "indexed", documents, token_info=ids)
        scanned = root / "scanned"
        shutil.copytree(dataset, scanned)
        index = json.loads((scanned / "index.json").read_text())
        del index["tikmix"]
        (scanned / "index.json").write_text(json.dumps(index))
        (scanned / "tikmix-lengths.npy").unlink()

        def first_open(path: Path):
            def open_once():
                os.environ["TIKMIX_CACHE_DIR"] = tempfile.mkdtemp(dir=root)  # an empty cache every time
                Domain("bench", path, eos_id=256, vocab_size=258)  # the scanned copy records no ids

            return open_once

        scan_seconds = timed(first_open(scanned), args.repeats)
        index_seconds = timed(first_open(dataset), args.repeats)
        tokens = sum(len(document) for document in documents)
        print(f"# first open: {args.open_docs} documents, {tokens} tokens, {tokens * 2 / 1e6:.0f} MB")
        print(row("first open, scan (baseline)", scan_seconds, scan_seconds))
        print(row("first open, conversion index", index_seconds, scan_seconds))

        small = write_mds(root / "small-shards", documents, size_limit=args.shard_bytes, token_info=ids)
        shards = len(json.loads((small / "index.json").read_text())["shards"])
        remote = MDSSource(root / "remote-cache", remote=str(small), prefetch_shards=0)
        at_open = len(list((root / "remote-cache").glob("shard.*")))
        remote.read_docs(0, 1)
        after_read = len(list((root / "remote-cache").glob("shard.*")))
        print(
            f"remote: {shards} shards; in the local cache after open {at_open}, after the first read "
            f"{after_read} (the previous implementation fetched all {shards} at open)"
        )
    finally:
        if previous_cache is None:
            os.environ.pop("TIKMIX_CACHE_DIR", None)
        else:
            os.environ["TIKMIX_CACHE_DIR"] = previous_cache
        shutil.rmtree(root, ignore_errors=True)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--megabytes", type=float, default=8.0, help="text to convert (default: 8)")
    parser.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary size (default: 8000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (default: 3)")
    parser.add_argument(
        "--open-docs", type=int, default=100_000, help="documents of the first-open case (default: 100000)"
    )
    parser.add_argument(
        "--shard-bytes", type=int, default=1 << 20, help="shard size of the remote case (default: 1 MiB)"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cli_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
