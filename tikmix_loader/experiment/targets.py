"""What a run trains on, decides against and is scored on: the experiment's three target modes.

- ``domains`` (the default): train on every domain's train split; the targets are every domain's val split;
  the metric is every domain's test split (averaged with equal weights, and the worst).
- ``hold-out NAME``: train on the other domains; the targets are NAME's val split; the metric is NAME's
  test split.
- ``dir DIR``: train on every domain; the target set is a directory of UTF-8 text files, one document per
  file, tokenised with the corpus's tokenizer and split by file into a val half (the targets) and a test half
  (the metric). The split is fixed by the files' paths: files ordered by the sha256 of their path relative
  to DIR go alternately to val and test (val gets the odd one out), so the halves differ by at most one file
  and do not depend on listing order. Adding a file may move others; the halves are balanced rather than
  stable. See ``docs/experiment.md``.

"Targets" are what the influence methods optimise and what RegMix's proxies are scored on; the metric is
read once per run, after training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from tikmix_loader.data.convert import expand_inputs, write_dataset
from tikmix_loader.data.corpus import MANIFEST_FILE
from tikmix_loader.data.domain import Domain
from tikmix_loader.data.tokenizer import load_tokenizer
from tikmix_loader.errors import ConfigError, ConversionError, DomainError
from tikmix_loader.experiment.corpus_splits import CorpusSplits

TARGETS_DIR = "targets"  # under the experiment's --out: the tokenised halves of a --targets directory


@dataclass(frozen=True)
class TargetSet:
    """The domains a run trains on (``train``), decides against (``val``) and is scored on (``test``)."""

    mode: str
    train: tuple[Domain, ...]
    val: tuple[Domain, ...]
    test: tuple[Domain, ...]
    source: str | None = None  # the held-out domain or the target directory

    def describe(self) -> dict:
        """The target mode as ``results.json`` records it."""
        return {
            "mode": self.mode,
            "source": self.source,
            "train": [domain.name for domain in self.train],
            "val": [domain.name for domain in self.val],
            "test": [domain.name for domain in self.test],
        }


def all_domains(splits: CorpusSplits) -> TargetSet:
    """Train on every domain, target every domain's val split, score every domain's test split."""
    return TargetSet("domains", splits.train, splits.val, splits.test)


def hold_out(splits: CorpusSplits, name: str) -> TargetSet:
    """Train on every domain but ``name``; target its val split and score its test split.

    Raises:
        DomainError: ``name`` is not a domain of the corpus (the message lists them), or it is the only one.
    """
    names = splits.names
    if name not in names:
        raise DomainError(f"--hold-out {name!r} is not a domain of the corpus; its domains are {names}.")
    if len(names) < 2:
        raise DomainError(f"--hold-out {name!r}: the corpus has no other domain to train on.")
    index = names.index(name)
    return TargetSet(
        "hold-out",
        train=tuple(domain for domain in splits.train if domain.name != name),
        val=(splits.val[index],),
        test=(splits.test[index],),
        source=name,
    )


def _corpus_data_options(corpus: Path) -> tuple[str, str]:
    """The tokenizer and storage format the corpus in ``corpus`` was built with (its manifest)."""
    try:
        config = json.loads((corpus / MANIFEST_FILE).read_text())["config"]
        return config["tokenizer"], config["format"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"--targets needs the corpus's tokenizer, but {corpus / MANIFEST_FILE} does not record it "
            f"({error!r}); rebuild the corpus with `tikmix corpus`."
        ) from error


def split_target_files(directory: Path) -> dict[str, list[Path]]:
    """The files of ``directory`` in its val and test halves (see the module docstring).

    Raises:
        ConfigError: ``directory`` does not exist or holds fewer than two files.
    """
    if not directory.is_dir():
        raise ConfigError(f"--targets {directory}: no such directory.")
    try:
        files = expand_inputs([directory])
    except ConversionError as error:
        raise ConfigError(f"--targets {directory}: {error}") from error
    if len(files) < 2:
        raise ConfigError(
            f"--targets {directory}: holds {len(files)} file(s); a val and a test half need at least 2."
        )
    ordered = sorted(files, key=lambda f: hashlib.sha256(str(f.relative_to(directory)).encode()).hexdigest())
    return {"val": ordered[0::2], "test": ordered[1::2]}


def _read_text(file: Path, directory: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"--targets {directory}: {file} is not UTF-8 text ({error}); remove or convert it."
        ) from error


def text_targets(
    splits: CorpusSplits, directory: str | os.PathLike, *, corpus: str | os.PathLike, out: Path, seq_len: int
) -> TargetSet:
    """Train on every domain; the target set is the text in ``directory``, tokenised into
    ``out/targets/<name>/{val,test}`` (``name``: the directory's name).

    Raises:
        ConfigError: a missing or too small directory, a file that is not UTF-8, or a half too short for one
            sample of ``seq_len`` tokens; each names the directory.
    """
    directory = Path(directory)
    halves = split_target_files(directory)
    tokenizer_spec, data_format = _corpus_data_options(Path(corpus))
    tokenizer = load_tokenizer(tokenizer_spec)
    name = directory.resolve().name
    domains = {}
    for split, files in halves.items():
        path = out / TARGETS_DIR / name / split
        write_dataset(
            path,
            (tokenizer.encode(_read_text(file, directory)) for file in files),
            name=f"{name}/{split}",
            format=data_format,
            tokenizer=tokenizer,
            overwrite=True,
        )
        domains[split] = Domain(name, path)
        if domains[split].num_samples(seq_len) < 1:
            raise ConfigError(
                f"--targets {directory}: its {split} half ({[str(f) for f in files]}) holds "
                f"{domains[split].num_tokens} tokens, too few for one sample of seq_len={seq_len}; add text."
            )
    return TargetSet("dir", splits.train, (domains["val"],), (domains["test"],), source=str(directory))


def select_targets(
    splits: CorpusSplits,
    *,
    hold_out_name: str | None,
    directory: str | os.PathLike | None,
    corpus: str | os.PathLike,
    out: Path,
    seq_len: int,
) -> TargetSet:
    """The target set that ``--hold-out`` / ``--targets`` ask for (neither: every domain)."""
    if hold_out_name is not None:
        return hold_out(splits, hold_out_name)
    if directory is not None:
        return text_targets(splits, directory, corpus=corpus, out=out, seq_len=seq_len)
    return all_domains(splits)
