"""The mixture ledger: an append-only, fsynced, hash-chained JSONL log of every mixture decision.

Format (version 1). One record per line, each line the canonical JSON of the record (keys sorted, no spaces,
ASCII only, no NaN). Every record holds::

    version         1
    index           0-based position in the ledger
    step            training step of the decision (non-decreasing over the ledger)
    tokens_seen     training tokens consumed before the decision (non-decreasing)
    method          mixer name, e.g. "tikmix_d"
    weights_before  {domain: weight} in force before the decision
    weights_after   {domain: weight} chosen by the decision (same domains)
    influence       {"targets": [...], "domains": [...], "values": [[...]]} (S, targets x domains) or null
    solver          {"status", "reason", "objective", "terms", "iterations", "fallback"} or null
    prev_hash       the previous record's ``hash`` ("0" * 64 for the first record)
    hash            sha256 hex of the canonical JSON of this record without ``hash``

Callers may add further JSON-safe keys. ``MixtureController.set_quality`` writes a record with method
``"quality"``, unchanged weights and ``quality`` ({domain: QuaDMix parameters} in force after it). The
ledger adds no wall-clock time, so a resumed run that makes the same decisions writes the same bytes.

What the chain detects, and what it cannot. Each record's hash covers its content and ``prev_hash``, and
each record carries its ``index``. So :func:`verify` names the first line where a record was edited, where a
record was deleted from the middle, inserted, duplicated or moved, and a torn last line (a crash during a
write). Two limits are inherent to any unkeyed hash chain:

* Removing the last k whole records leaves a valid, shorter chain. Detecting it needs an *anchor*, a record
  of how far the ledger had grown. The writer keeps one in the sidecar ``PATH.head`` (the record count and
  last hash, replaced atomically after every append), and :func:`verify` checks against it. Because the
  sidecar can be deleted along with the tail, an anchor kept elsewhere is stronger: the controller's
  checkpoint (:meth:`MixtureLedger.state_dict`), or the count and last hash that ``tikmix ledger verify``
  prints, passed back as ``expected_records`` / ``expected_last_hash``.
* Anyone who can write the file can also recompute every hash after an edit. The chain catches accidental
  damage and naive edits; against deliberate forgery, compare the last hash with an anchor stored where the
  forger cannot write. The last hash commits to the whole history, so one matching hash vouches for it all.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tikmix_loader.errors import LedgerError, StateError

LEDGER_VERSION = 1
GENESIS_HASH = "0" * 64
HEAD_SUFFIX = ".head"
REQUIRED_KEYS = ("step", "tokens_seen", "method", "weights_before", "weights_after")
RESERVED_KEYS = ("version", "index", "prev_hash", "hash")
SOLVER_KEYS = ("status", "reason", "objective", "terms", "iterations", "fallback")
INFLUENCE_KEYS = ("targets", "domains", "values")


def canonical_json(obj) -> str:
    """The one serialisation used for hashing and for the stored line: sorted keys, compact, ASCII, no NaN.

    Python's float ``repr`` is the shortest string that round-trips, so parsing a line and serialising it
    again gives the same bytes; :func:`verify` relies on this to detect byte-level edits.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def record_hash(record: Mapping) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` key."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def head_path(path: str | os.PathLike) -> Path:
    """The anchor sidecar of the ledger at ``path``: ``PATH.head``."""
    return Path(f"{os.fspath(path)}{HEAD_SUFFIX}")


# ---------------------------------------------------------------- converting caller values to exact JSON


def _json_safe(value, where: str):
    """``value`` as plain JSON types (numpy scalars and arrays converted); NaN and infinity are refused."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LedgerError(
                f"Ledger value `{where}` is {value!r}; a ledger must be exact, so record a finite number "
                "(or null for a value that does not exist, e.g. the objective of a solver that did not run)."
            )
        return float(value)
    if isinstance(value, np.ndarray):
        return [_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value.tolist())]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise LedgerError(f"Ledger mapping `{where}` has a non-string key {key!r}; use str keys.")
            out[key] = _json_safe(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_safe(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise LedgerError(
        f"Ledger value `{where}` has type {type(value).__name__}, which JSON cannot hold exactly; "
        "convert it to numbers, strings, lists or dicts."
    )


def _count(value, name: str) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LedgerError(f"Ledger record `{name}` must be a non-negative int, got {value!r}.")
    return value


def _weights(value, name: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise LedgerError(
            f"Ledger record `{name}` must be a non-empty {{domain: weight}} dict, got {value!r}."
        )
    weights = _json_safe(value, name)
    for domain, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise LedgerError(
                f"Ledger record `{name}[{domain!r}]` must be a finite weight >= 0, got {weight!r}."
            )
    return {domain: float(weight) for domain, weight in weights.items()}


def _influence(value) -> dict | None:
    """S as ``{"targets", "domains", "values"}``; accepts a mapping or an object with those attributes."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        if not all(hasattr(value, key) for key in INFLUENCE_KEYS):
            raise LedgerError(
                f"Ledger record `influence` must be None, a dict or an object with {INFLUENCE_KEYS}, "
                f"got {type(value).__name__}."
            )
        value = {key: getattr(value, key) for key in INFLUENCE_KEYS}
    missing = [key for key in INFLUENCE_KEYS if key not in value]
    if missing:
        raise LedgerError(f"Ledger record `influence` lacks keys {missing}; it needs {INFLUENCE_KEYS}.")
    influence = _json_safe(value, "influence")
    targets, domains, values = (influence[key] for key in INFLUENCE_KEYS)
    for key, names in (("targets", targets), ("domains", domains)):
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise LedgerError(
                f"Ledger record `influence.{key}` must be a non-empty list of names, got {names!r}."
            )
    shape_ok = isinstance(values, list) and len(values) == len(targets)
    shape_ok = shape_ok and all(isinstance(row, list) and len(row) == len(domains) for row in values)
    if not shape_ok:
        raise LedgerError(
            f"Ledger record `influence.values` must be a [{len(targets)} targets x {len(domains)} domains] "
            f"matrix, got {np.asarray(values, dtype=object).shape}."
        )
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for row in values for x in row):
        raise LedgerError("Ledger record `influence.values` must hold only numbers.")
    influence["values"] = [[float(x) for x in row] for row in values]
    return influence


def _solver(value) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise LedgerError(f"Ledger record `solver` must be None or a dict with {SOLVER_KEYS}, got {value!r}.")
    missing = [key for key in SOLVER_KEYS if key not in value]
    if missing:
        raise LedgerError(f"Ledger record `solver` lacks keys {missing}; it needs {SOLVER_KEYS}.")
    solver = _json_safe(value, "solver")
    if not isinstance(solver["terms"], (dict, type(None))):
        raise LedgerError(
            f"Ledger record `solver.terms` must be a {{name: value}} dict, got {solver['terms']!r}."
        )
    return solver


def _normalise(record: Mapping) -> dict:
    """The caller's record checked and converted to exact JSON types, reserved keys not yet added."""
    if not isinstance(record, Mapping):
        raise LedgerError(f"`record` must be a dict, got {type(record).__name__}.")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise LedgerError(f"Ledger record lacks required keys {missing}; every record needs {REQUIRED_KEYS}.")
    reserved = [key for key in RESERVED_KEYS if key in record]
    if reserved:
        raise LedgerError(
            f"Ledger record must not set {reserved}; the ledger assigns {RESERVED_KEYS} itself."
        )
    checked = (*REQUIRED_KEYS, "influence", "solver")
    out = _json_safe({key: value for key, value in record.items() if key not in checked}, "record")
    out["step"] = _count(record["step"], "step")
    out["tokens_seen"] = _count(record["tokens_seen"], "tokens_seen")
    if not isinstance(record["method"], str) or not record["method"]:
        raise LedgerError(f"Ledger record `method` must be a non-empty string, got {record['method']!r}.")
    out["method"] = record["method"]
    out["weights_before"] = _weights(record["weights_before"], "weights_before")
    out["weights_after"] = _weights(record["weights_after"], "weights_after")
    if set(out["weights_before"]) != set(out["weights_after"]):
        raise LedgerError(
            f"Ledger record `weights_before` names {sorted(out['weights_before'])} but `weights_after` names "
            f"{sorted(out['weights_after'])}; both must cover the same domains."
        )
    out["influence"] = _influence(record.get("influence"))
    out["solver"] = _solver(record.get("solver"))
    return out


# ---------------------------------------------------------------- reading and checking a ledger file


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    Attributes:
        path (str): The ledger checked.
        ok (bool): True when the whole file is an intact chain and matches every anchor given.
        num_records (int): Records in the intact prefix (all of them when ``ok``).
        last_hash (str | None): Hash of the last intact record; None for an empty ledger.
        line (int | None): 1-based line number of the first problem; None when ``ok``.
        reason (str | None): What is wrong at ``line`` and the likely cause, e.g. "duplicates line 2";
            None when ``ok``.
        first_step (int | None): ``step`` of the first intact record.
        last_step (int | None): ``step`` of the last intact record.
        warnings (tuple[str, ...]): Conditions that are not failures, e.g. no anchor for tail truncation.
    """

    path: str
    ok: bool
    num_records: int
    last_hash: str | None
    line: int | None = None
    reason: str | None = None
    first_step: int | None = None
    last_step: int | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        """One line for humans: the counts and last hash to anchor on, or the failure."""
        if not self.ok:
            return f"{self.path}: FAILED at line {self.line}: {self.reason}"
        if self.num_records == 0:
            return f"{self.path}: OK, empty ledger"
        return (
            f"{self.path}: OK, {self.num_records} records, steps {self.first_step}..{self.last_step}, "
            f"last hash {self.last_hash}"
        )

    def raise_if_failed(self) -> VerifyResult:
        """Raise ``LedgerError`` with the path, line and reason unless ``ok``; return self otherwise."""
        if not self.ok:
            raise LedgerError(f"Ledger {self.path} is damaged at line {self.line}: {self.reason}")
        return self


@dataclass
class _Scan:
    """The intact prefix of a ledger file and the first problem after it (internal to this module)."""

    records: list[dict]
    ends: list[int]  # byte offset just past each intact record's line
    line: int | None = None
    reason: str | None = None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON and never written to a ledger")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows to {value}, which a ledger never holds")
    return value


def _strict_json(text: str):
    """``json.loads`` that refuses what the writer never emits: NaN, Infinity and floats that overflow.

    Nesting too deep for the parser raises ``RecursionError``, which callers report like any other bad line.
    """
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def _parse_lines(data: bytes) -> tuple[list[tuple[int, int, dict]], int | None, str | None]:
    """Parse each newline-terminated line; return ``(end offset, line number, record)`` triples and the first
    line that is torn, empty, not JSON or not canonical."""
    parsed: list[tuple[int, int, dict]] = []
    offset = 0
    lineno = 0
    while offset < len(data):
        lineno += 1
        newline = data.find(b"\n", offset)
        if newline < 0:
            return (
                parsed,
                lineno,
                (
                    f"incomplete line (no trailing newline, {len(data) - offset} bytes): "
                    "a torn write, e.g. a crash during append, or the file was cut mid-record"
                ),
            )
        raw = data[offset:newline]
        if not raw:
            return parsed, lineno, "empty line; a ledger has exactly one record per line"
        try:
            record = _strict_json(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return (
                parsed,
                lineno,
                f"not valid JSON for a ledger ({type(exc).__name__}: {exc}); the line was edited or "
                "corrupted",
            )
        if not isinstance(record, dict):
            return parsed, lineno, "not a JSON object; the line was edited"
        parsed.append((newline + 1, lineno, record))
        offset = newline + 1
    return parsed, None, None


def _check_record(record: dict, lineno: int, raw_is_canonical: bool) -> str | None:
    if record.get("version") != LEDGER_VERSION:
        return f"ledger version {record.get('version')!r}; this reader knows version {LEDGER_VERSION}"
    missing = [key for key in (*REQUIRED_KEYS, "influence", "solver", *RESERVED_KEYS) if key not in record]
    if missing:
        return f"lacks keys {missing}; the record was edited"
    if not all(
        isinstance(record[key], int) and not isinstance(record[key], bool)
        for key in ("index", "step", "tokens_seen")
    ):
        return "index, step and tokens_seen must be ints; the record was edited"
    if record_hash(record) != record["hash"]:
        return "record content does not match its hash; the record was edited"
    if not raw_is_canonical:
        return "not in canonical form although its hash matches; its bytes were edited"
    return None


def _scan(path: Path) -> _Scan:
    """Read the whole ledger and check every line and link, stopping at the first problem.

    Ledgers hold one record per mixture decision (thousands at most), so reading the file in full is cheap
    and lets a reordering be told apart from a deletion by looking ahead.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LedgerError(f"No ledger at {path}; check the path (MixtureLedger creates new ones).") from None
    parsed, bad_line, bad_reason = _parse_lines(data)
    line_of_index: dict[int, int] = {}
    for _, lineno, record in parsed:
        if isinstance(record.get("index"), int):
            line_of_index.setdefault(record["index"], lineno)
    records: list[dict] = []
    ends: list[int] = []
    line_of_hash: dict[str, int] = {}
    start = 0
    for end, lineno, record in parsed:
        raw = data[start : end - 1]
        start = end
        try:
            reason = _check_record(record, lineno, canonical_json(record).encode("ascii") == raw)
            if reason is None:
                reason = _check_link(record, lineno, records, line_of_hash, line_of_index)
        except (TypeError, ValueError, RecursionError) as exc:  # a well-formed line of the wrong shape
            reason = f"malformed record ({type(exc).__name__}: {exc}); the line was edited"
        if reason is not None:
            return _Scan(records, ends, lineno, reason)
        records.append(record)
        ends.append(end)
        line_of_hash[record["hash"]] = lineno
    return _Scan(records, ends, bad_line, bad_reason)


def _check_link(
    record: dict,
    lineno: int,
    previous: list[dict],
    line_of_hash: dict[str, int],
    line_of_index: dict[int, int],
) -> str | None:
    """Why ``record`` at ``lineno`` cannot follow ``previous`` (None when it can)."""
    expected = len(previous)
    if record["hash"] in line_of_hash:
        return f"duplicates line {line_of_hash[record['hash']]}"
    index = record["index"]
    if index != expected:
        if isinstance(index, int) and index > expected:
            later = line_of_index.get(expected)
            if later is not None and later > lineno:
                return (
                    f"holds record {index} but record {expected} is at line {later}; records were reordered"
                )
            deleted = (
                f"record {expected} was" if index == expected + 1 else f"records {expected}..{index - 1} were"
            )
            return f"holds record {index}, expected record {expected}; {deleted} deleted"
        return f"holds record {index!r}, expected record {expected}; records were reordered or added"
    prev_hash = previous[-1]["hash"] if previous else GENESIS_HASH
    if record["prev_hash"] != prev_hash:
        if not previous:
            return "prev_hash is not the genesis hash; the first record was replaced"
        return (
            f"prev_hash does not match line {lineno - 1}'s hash; line {lineno - 1} was "
            "rewritten (hash recomputed) or a record was inserted or removed here"
        )
    if previous and (
        record["step"] < previous[-1]["step"] or record["tokens_seen"] < previous[-1]["tokens_seen"]
    ):
        return f"step or tokens_seen goes backwards from line {lineno - 1}"
    return None


def _read_head(path: Path) -> dict | None:
    head = head_path(path)
    if not head.exists():
        return None
    try:
        state = _strict_json(head.read_text("ascii"))
        if not isinstance(state, dict):
            raise ValueError("not an object")
        _check_state(state, f"head sidecar {head}")
    except (ValueError, StateError, RecursionError) as exc:
        raise LedgerError(
            f"Ledger head sidecar {head} is corrupt ({exc}); delete it to verify without it."
        ) from exc
    return state


def _check_anchor(
    records: list[dict], num_records: int, last_hash: str | None, source: str, *, allow_lag: int = 0
) -> tuple[int | None, str | None, str | None]:
    """Compare the intact records with an anchor; return ``(line, reason, warning)``."""
    have = len(records)
    if have < num_records:
        return (
            have + 1,
            f"the ledger is truncated: {source} records {num_records} records, the file holds {have}; "
            f"records from line {have + 1} on were removed",
            None,
        )
    anchored = records[num_records - 1]["hash"] if num_records else None
    if anchored != last_hash:
        return (
            max(num_records, 1),
            f"record {num_records} has hash {anchored}, {source} expects {last_hash}; history was rewritten",
            None,
        )
    if have - num_records > allow_lag:
        return (
            num_records + 1,
            f"the file holds {have - num_records} record(s) beyond {source} ({num_records}); "
            f"lines {num_records + 1}..{have} were appended after the anchor",
            None,
        )
    if have > num_records:
        return (
            None,
            None,
            (
                f"{source} lags the file by {have - num_records} record; a crash between appending a record "
                "and updating the anchor leaves this, and the next append repairs it"
            ),
        )
    return None, None, None


def _anchors(
    path: Path,
    records: list[dict],
    expected_records: int | None,
    expected_last_hash: str | None,
    use_head: bool,
) -> tuple[list[tuple[int, str | None, str, int]], list[str]]:
    """The anchors to check as ``(record count, last hash, source, allowed lag)``, and warnings."""
    anchors, warnings = [], []
    if use_head:
        head = _read_head(path)
        if head is not None:
            # The writer appends the record before replacing the head, so a crash may leave it one behind.
            anchors.append((head["num_records"], head["last_hash"], f"head sidecar {head_path(path)}", 1))
        elif records:
            warnings.append(
                f"no head sidecar {head_path(path)}: removal of trailing records cannot be detected; "
                "pass --expect-records/--expect-hash from a trusted anchor"
            )
    hashes = [record["hash"] for record in records]
    if expected_records is not None:
        if expected_last_hash is None:  # a bare count: only the length is checked
            hash_at_count = hashes[expected_records - 1] if 0 < expected_records <= len(hashes) else None
            anchors.append((expected_records, hash_at_count, "the expected record count", 0))
        else:
            anchors.append((expected_records, expected_last_hash, "the expected anchor", 0))
    elif expected_last_hash is not None:
        count = hashes.index(expected_last_hash) + 1 if expected_last_hash in hashes else None
        anchors.append((count, expected_last_hash, "the expected last hash", 0))
    return anchors, warnings


def _verify_scan(
    path: Path, *, expected_records: int | None, expected_last_hash: str | None, use_head: bool
) -> tuple[VerifyResult, _Scan]:
    scan = _scan(path)
    records, line, reason, warnings = scan.records, scan.line, scan.reason, []
    if reason is None:
        anchors, warnings = _anchors(path, records, expected_records, expected_last_hash, use_head)
        for count, last_hash, source, lag in anchors:
            if count is None:
                line, reason = (
                    len(records) + 1,
                    (
                        f"{source} {last_hash} is not the hash of any record; the history was rewritten or "
                        "the "
                        "anchored records were removed"
                    ),
                )
            else:
                line, reason, warning = _check_anchor(records, count, last_hash, source, allow_lag=lag)
                warnings += [warning] if warning else []
            if reason is not None:
                break
    result = VerifyResult(
        path=os.fspath(path),
        ok=reason is None,
        num_records=len(records),
        last_hash=records[-1]["hash"] if records else None,
        line=line,
        reason=reason,
        first_step=records[0]["step"] if records else None,
        last_step=records[-1]["step"] if records else None,
        warnings=tuple(warnings),
    )
    return result, scan


def verify(
    path: str | os.PathLike,
    *,
    expected_records: int | None = None,
    expected_last_hash: str | None = None,
    use_head: bool = True,
) -> VerifyResult:
    """Check a ledger file for any edit, truncation, reordering, insertion or duplication.

    Every line must be intact canonical JSON whose hash matches, with consecutive ``index`` and ``prev_hash``
    linking to the line before. Tail truncation (whole trailing records removed) is invisible to the chain
    itself (see the module docstring), so it is checked against anchors: the ``PATH.head`` sidecar when
    present (which may lag by one record after a crash), and the optional expected values from a trusted
    place, which must match exactly.

    Args:
        path (str | PathLike): The ledger JSONL file.
        expected_records (int | None): The file must hold exactly this many records. Default: None.
        expected_last_hash (str | None): The file's last record must have this hash; with
            ``expected_records``, record ``expected_records`` must. Default: None.
        use_head (bool): Check against the ``PATH.head`` sidecar if it exists. Default: True.

    Returns:
        VerifyResult: ``ok``, counts, last hash, and for a failure the 1-based ``line`` and the ``reason``.

    Raises:
        LedgerError: The file does not exist or its head sidecar is unreadable.
    """
    result, _ = _verify_scan(
        Path(path),
        expected_records=expected_records,
        expected_last_hash=expected_last_hash,
        use_head=use_head,
    )
    return result


def load_records(path: str | os.PathLike) -> list[dict]:
    """All records of a ledger after :func:`verify` passes (head sidecar included).

    Raises:
        LedgerError: The ledger is missing or damaged; the message names the line and the reason.
    """
    result, scan = _verify_scan(Path(path), expected_records=None, expected_last_hash=None, use_head=True)
    result.raise_if_failed()
    return scan.records


def _check_state(state, what: str) -> None:
    if not isinstance(state, Mapping) or set(state) != set(MixtureLedger.STATE_KEYS):
        raise StateError(f"{what} must be a dict with keys {MixtureLedger.STATE_KEYS}, got {state!r}.")
    count, last_hash = state["num_records"], state["last_hash"]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise StateError(f"{what} `num_records` must be an int >= 0, got {count!r}.")
    if (count == 0) != (last_hash is None) or not (last_hash is None or isinstance(last_hash, str)):
        raise StateError(f"{what} `last_hash` must be None exactly when `num_records` is 0, got {state!r}.")


# ---------------------------------------------------------------- the writer


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a file created or renamed in it survives a crash (POSIX)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MixtureLedger:
    """Append-only writer (and reader) of one ledger file; see the module docstring for the format.

    Opening an existing file reads and checks all of it and resumes the chain after the last intact record.
    A damaged file still opens, so that :meth:`truncate_to` can be reached, but :meth:`append` and
    :meth:`load_state_dict` refuse until the damage is cut away explicitly: nothing is ever dropped silently.
    Only one process may write a ledger (under torch.distributed, rank 0).

    Resume protocol, used by the controller. A checkpoint saves :meth:`state_dict` (record count and last
    hash) next to the model. After a crash, the file may hold records written after that checkpoint, and a
    torn last line. The resumed run makes those decisions again, so to reproduce the same ledger it first
    calls ``truncate_to(state["num_records"], expected_last_hash=state["last_hash"])`` and then
    ``load_state_dict(state)``. ``load_state_dict`` alone never truncates: loading an older or wrong
    checkpoint must fail loudly rather than erase audit history.

    Args:
        path (str | PathLike): The JSONL file; created (with its parent directory) if missing.
        fsync (bool): flush and ``os.fsync`` the file after each append (and the head sidecar and directory
            after each change), so an acknowledged record survives a power loss. Default: True.
        head (bool): Keep the ``PATH.head`` anchor sidecar, which lets :func:`verify` detect removal of
            trailing records. Default: True.

    Raises:
        LedgerError: The head sidecar is unreadable, or exists while ``head=False`` (appends would leave it
            stale, and :func:`verify` would then report the new records as foreign).
    """

    STATE_KEYS = ("num_records", "last_hash")

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True, head: bool = True):
        self.path = Path(path)
        self.fsync = bool(fsync)
        self.head = bool(head)
        if not self.head and head_path(self.path).exists():
            raise LedgerError(
                f"Ledger {self.path} has a head sidecar {head_path(self.path)} but was opened with "
                "head=False; appends would leave it stale. Open with head=True, or delete the sidecar "
                "to stop anchoring."
            )
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "xb") as file:
                self._sync(file)
            if self.fsync:
                _fsync_dir(self.path.parent)
        result, scan = _verify_scan(self.path, expected_records=None, expected_last_hash=None, use_head=head)
        # Per intact record: its hash, (step, tokens_seen) and the byte offset where its line ends.
        self._hashes = [record["hash"] for record in scan.records]
        self._positions = [(record["step"], record["tokens_seen"]) for record in scan.records]
        self._ends = list(scan.ends)
        self._damage = None if result.ok else f"line {result.line}: {result.reason}"
        self._expected_size = self.path.stat().st_size

    def __len__(self) -> int:
        """Intact records in the ledger."""
        return len(self._hashes)

    @property
    def last_hash(self) -> str | None:
        """Hash of the last intact record (None when empty): the value to anchor the ledger on."""
        return self._hashes[-1] if self._hashes else None

    @property
    def damage(self) -> str | None:
        """Where and how the file is damaged beyond its intact prefix; None when it is whole."""
        return self._damage

    def _sync(self, file) -> None:
        file.flush()
        if self.fsync:
            os.fsync(file.fileno())

    def _refuse_if_damaged(self, action: str) -> None:
        if self._damage is not None:
            raise LedgerError(
                f"Cannot {action} ledger {self.path}: it is damaged at {self._damage}. Its first "
                f"{len(self)} records are intact; call truncate_to(n) with n <= {len(self)} "
                "to drop everything after record n, if that is what you intend."
            )
        size = self.path.stat().st_size
        if size != self._expected_size:
            raise LedgerError(
                f"Ledger {self.path} changed on disk since it was opened ({self._expected_size} -> {size} "
                "bytes): another process is writing it. Only one writer may hold a ledger; reopen it."
            )

    def append(self, record: Mapping) -> dict:
        """Check, hash and durably append one decision.

        Args:
            record (Mapping): ``step``, ``tokens_seen``, ``method``, ``weights_before``, ``weights_after``,
                and optionally ``influence`` (a dict or an object with ``targets``/``domains``/``values``,
                e.g. an ``InfluenceMatrix``), ``solver`` (a dict with ``SOLVER_KEYS``) and further
                JSON-safe keys. numpy values are converted; NaN and infinity are refused.

        Returns:
            dict: The record as stored, with ``version``, ``index``, ``prev_hash`` and ``hash``.

        Raises:
            LedgerError: A field is missing or not exact JSON, step or tokens go backwards, or the file is
                damaged or was changed by another process.
        """
        self._refuse_if_damaged("append to")
        stored = _normalise(record)
        last_step, last_tokens = self._positions[-1] if self._positions else (0, 0)
        if stored["step"] < last_step or stored["tokens_seen"] < last_tokens:
            raise LedgerError(
                f"Ledger record step={stored['step']}, tokens_seen={stored['tokens_seen']} goes backwards "
                f"from the last record (step={last_step}, tokens_seen={last_tokens}) in {self.path}; on "
                "resume, call truncate_to() with the checkpoint's state first."
            )
        stored.update(version=LEDGER_VERSION, index=len(self), prev_hash=self.last_hash or GENESIS_HASH)
        stored["hash"] = record_hash(stored)
        line = (canonical_json(stored) + "\n").encode("ascii")
        try:
            with open(self.path, "ab") as file:
                file.write(line)
                self._sync(file)
        except BaseException:
            self._damage = "an append that failed part-way (the last line may be torn)"
            raise
        self._hashes.append(stored["hash"])
        self._positions.append((stored["step"], stored["tokens_seen"]))
        self._expected_size += len(line)
        self._ends.append(self._expected_size)
        self._write_head()
        return stored

    def _write_head(self) -> None:
        """Replace the anchor sidecar atomically (write a temporary file, fsync, rename)."""
        if not self.head:
            return
        head = head_path(self.path)
        tmp = head.with_name(head.name + ".tmp")
        with open(tmp, "w", encoding="ascii") as file:
            file.write(canonical_json(self.state_dict()) + "\n")
            self._sync(file)
        os.replace(tmp, head)
        if self.fsync:
            _fsync_dir(head.parent)

    def records(self) -> Iterator[dict]:
        """Yield the records from disk in order, checking the chain; raise ``LedgerError`` at the first damage
        after yielding the intact records before it."""
        scan = _scan(self.path)
        yield from scan.records
        if scan.reason is not None:
            raise LedgerError(f"Ledger {self.path} is damaged at line {scan.line}: {scan.reason}")

    def state_dict(self) -> dict:
        """``{"num_records": n, "last_hash": h}``: the position to save with a checkpoint."""
        return {"num_records": len(self), "last_hash": self.last_hash}

    def load_state_dict(self, state: Mapping) -> None:
        """Check that the file is exactly at the checkpointed position; never changes the file.

        Raises:
            StateError: ``state`` is not a ledger state dict.
            LedgerError: The file is damaged, shorter than the checkpoint, holds a different history, or holds
                records written after the checkpoint (the message gives the ``truncate_to`` call to make).
        """
        _check_state(state, "Ledger state")
        count, last_hash = state["num_records"], state["last_hash"]
        fix = f"call truncate_to({count}, expected_last_hash={last_hash!r}) first"
        if self._damage is not None and count <= len(self):
            raise LedgerError(
                f"Ledger {self.path} is damaged at {self._damage}; to resume the checkpoint, {fix}."
            )
        if count > len(self):
            raise LedgerError(
                f"Ledger {self.path} holds {len(self)} intact records but the checkpoint expects "
                f"{count}; the ledger was truncated or is not this run's ledger."
            )
        anchored = self._hashes[count - 1] if count else None
        if anchored != last_hash:
            raise LedgerError(
                f"Ledger {self.path} record {count} has hash {anchored}, the checkpoint expects {last_hash}; "
                "this ledger holds a different history than the checkpoint (wrong file or rewritten)."
            )
        if count < len(self):
            raise LedgerError(
                f"Ledger {self.path} holds {len(self) - count} record(s) written after the "
                f"checkpoint ({len(self)} vs {count}); a resumed run rewrites them, so {fix}."
            )

    def truncate_to(self, num_records: int, *, expected_last_hash: str | None = None) -> None:
        """Explicitly drop every record after the first ``num_records`` (and any damaged bytes after them).

        Args:
            num_records (int): Records to keep; at most the intact count ``len(self)``.
            expected_last_hash (str | None): If given, record ``num_records`` must have this hash, so a
                checkpoint can never truncate a ledger with a different history. Default: None.

        Raises:
            LedgerError: ``num_records`` is out of range or the kept history does not match the hash.
        """
        if (
            isinstance(num_records, bool)
            or not isinstance(num_records, int)
            or not (0 <= num_records <= len(self))
        ):
            raise LedgerError(
                f"truncate_to(`num_records`={num_records!r}) must be an int in [0, {len(self)}] for "
                f"ledger {self.path}; only intact records can be kept."
            )
        anchored = self._hashes[num_records - 1] if num_records else None
        if expected_last_hash is not None and anchored != expected_last_hash:
            raise LedgerError(
                f"Ledger {self.path} record {num_records} has hash {anchored}, not the expected "
                f"{expected_last_hash}; refusing to truncate a ledger with a different history."
            )
        end = self._ends[num_records - 1] if num_records else 0
        with open(self.path, "r+b") as file:
            file.truncate(end)
            self._sync(file)
        del self._hashes[num_records:], self._positions[num_records:], self._ends[num_records:]
        self._damage = None
        self._expected_size = end
        self._write_head()


# ---------------------------------------------------------------- command line


def _verify_command(args) -> int:
    result = verify(
        args.path,
        expected_records=args.expect_records,
        expected_last_hash=args.expect_hash,
        use_head=not args.no_head,
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    result.raise_if_failed()
    print(result.summary())
    return 0


def register(subparsers) -> None:
    """Add ``tikmix ledger verify PATH`` to the ``tikmix`` console script."""
    parser = subparsers.add_parser(
        "ledger", help="Inspect a mixture ledger.", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    check = commands.add_parser(
        "verify",
        help="Check the hash chain; exit 0 when intact, 2 with the failing line and reason.",
        description=verify.__doc__.splitlines()[0],
    )
    check.add_argument("path", help="The ledger JSONL file.")
    check.add_argument(
        "--expect-records", type=int, default=None, help="Fail unless it holds exactly N records."
    )
    check.add_argument("--expect-hash", default=None, help="Fail unless the last record has this hash.")
    check.add_argument("--no-head", action="store_true", help="Ignore the PATH.head anchor sidecar.")
    check.set_defaults(func=_verify_command)
