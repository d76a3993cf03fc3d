"""Tests for the hash-chained mixture ledger: round trip, tamper detection, anchors, resume, fsync and CLI."""

import hashlib
import json
import os
import re

import numpy as np
import pytest

from tikmix_loader import cli
from tikmix_loader.errors import LedgerError, StateError
from tikmix_loader.ledger import GENESIS_HASH, MixtureLedger, head_path, load_records, verify

DOMAINS = ("code", "math", "web")


def make_record(i: int) -> dict:
    """Decision ``i`` of a deterministic run, with numpy values as a mixer would produce them."""
    before = np.full(len(DOMAINS), 1.0 / len(DOMAINS)) if i == 0 else np.array([0.2, 0.3, 0.5])
    after = np.array([0.2, 0.3, 0.5], dtype=np.float32) + np.float32(0.01 * i) * np.array([1, 1, -2])
    return {
        "step": np.int64(100 * i),
        "tokens_seen": 4096 * 100 * i,
        "method": "tikmix_d",
        "weights_before": dict(zip(DOMAINS, before, strict=True)),
        "weights_after": dict(zip(DOMAINS, after, strict=True)),
        "influence": {
            "targets": ["val_code", "val_web"],
            "domains": list(DOMAINS),
            "values": np.arange(6, dtype=np.float64).reshape(2, 3) / (i + 1) - 1.0,
        },
        "solver": {
            "status": "success",
            "reason": None,
            "objective": np.float64(-1.5 + 0.1 * i),
            "terms": {"std": 0.1, "sum": -2.0, "entropy": 1.0 + 0.01 * i},
            "iterations": np.int32(7),
            "fallback": False,
        },
    }


def write_ledger(path, count: int, **options) -> MixtureLedger:
    ledger = MixtureLedger(path, **options)
    for i in range(len(ledger), count):
        ledger.append(make_record(i))
    return ledger


def independent_hash(record: dict) -> str:
    body = {key: value for key, value in record.items() if key != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def test_round_trip_chain(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = write_ledger(path, 5)
    stored = list(ledger.records())
    lines = path.read_text().splitlines()
    assert len(stored) == len(lines) == len(ledger) == 5
    previous = GENESIS_HASH
    for i, (record, line) in enumerate(zip(stored, lines, strict=True)):
        assert json.loads(line) == record
        assert record["index"] == i and record["prev_hash"] == previous
        assert record["hash"] == independent_hash(record)
        previous = record["hash"]
        expected = make_record(i)
        assert record["step"] == 100 * i
        # float32 weights are stored exactly as the float64 value of the float32.
        assert record["weights_after"] == {d: float(w) for d, w in expected["weights_after"].items()}
        assert record["influence"]["values"] == expected["influence"]["values"].tolist()
        assert record["solver"]["iterations"] == 7 and record["solver"]["reason"] is None
    result = verify(path)
    assert result.ok and result.warnings == ()
    assert (result.num_records, result.last_hash) == (5, ledger.last_hash)
    assert (result.first_step, result.last_step) == (0, 400)
    assert json.loads(head_path(path).read_text()) == ledger.state_dict()
    assert load_records(path) == stored


def test_append_returns_the_stored_record(tmp_path):
    ledger = MixtureLedger(tmp_path / "ledger.jsonl")
    stored = ledger.append({**make_record(0), "schedule": "every_n", "influence": None, "solver": None})
    assert stored == next(ledger.records())
    assert stored["schedule"] == "every_n" and stored["influence"] is None and stored["solver"] is None


def test_influence_object_with_attributes(tmp_path):
    class Matrix:
        targets = ["t"]
        domains = ["code", "web"]
        values = np.array([[0.5, -0.25]])

    record = {**make_record(0), "weights_before": {"code": 0.5, "web": 0.5}}
    record["weights_after"] = record["weights_before"]
    stored = MixtureLedger(tmp_path / "ledger.jsonl").append({**record, "influence": Matrix()})
    assert stored["influence"] == {"targets": ["t"], "domains": ["code", "web"], "values": [[0.5, -0.25]]}


def _edit_weight(lines):
    lines[2] = lines[2].replace('"code":0.2', '"code":0.9', 1)


def _rewrite_with_new_hash(lines):
    record = json.loads(lines[2])
    record["weights_after"]["code"] = 0.9
    record["hash"] = independent_hash(record)
    lines[2] = json.dumps(record, sort_keys=True, separators=(",", ":"))


def _truncate_mid_line(lines):
    lines[4] = lines[4][: len(lines[4]) // 2]


TAMPERINGS = {
    # name: (edit of the list of lines, line reported, pattern of the reason)
    "edit_weight": (_edit_weight, 3, r"does not match its hash.*edited"),
    "delete_middle": (
        lambda lines: lines.pop(2),
        3,
        r"holds record 3, expected record 2; record 2 was deleted",
    ),
    "swap": (lambda lines: lines.insert(2, lines.pop(1)), 2, r"record 1 is at line 3.*reordered"),
    "truncate_mid_line": (_truncate_mid_line, 5, r"incomplete.*torn"),
    "duplicate": (lambda lines: lines.insert(2, lines[1]), 3, r"duplicates line 2"),
    "rewrite_and_rehash": (_rewrite_with_new_hash, 4, r"prev_hash does not match line 3's hash"),
    "whitespace_only": (lambda lines: lines.__setitem__(1, lines[1].replace(",", ", ", 1)), 2, "canonical"),
    "blank_line": (lambda lines: lines.insert(3, ""), 4, r"empty"),
    "garbage": (lambda lines: lines.__setitem__(3, lines[3][:-1]), 4, r"not valid JSON"),
    "drop_first": (lambda lines: lines.pop(0), 1, r"record 0 was deleted"),
}


@pytest.mark.parametrize("name", sorted(TAMPERINGS))
def test_tampering_is_detected_with_its_line(tmp_path, name):
    edit, line, pattern = TAMPERINGS[name]
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, 5)
    lines = path.read_text().splitlines()
    edit(lines)
    trailing = "" if name == "truncate_mid_line" else "\n"
    path.write_text("\n".join(lines) + trailing)
    result = verify(path)
    assert not result.ok
    assert result.line == line, result.reason
    assert re.search(pattern, result.reason), result.reason
    assert result.summary().endswith(f"FAILED at line {line}: {result.reason}")
    with pytest.raises(LedgerError, match=f"damaged at line {line}: "):
        result.raise_if_failed()
    with pytest.raises(LedgerError, match=f"damaged at line {line}"):
        load_records(path)


def test_tail_truncation_needs_an_anchor(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = write_ledger(path, 5)
    anchor = ledger.state_dict()
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))  # remove the last two whole records
    # The chain alone cannot see it ...
    assert verify(path, use_head=False).ok
    # ... the head sidecar can, and so can an anchor kept elsewhere.
    result = verify(path)
    assert (result.ok, result.line) == (False, 4)
    assert re.search(r"truncated: head sidecar .* records 5 records, the file holds 3", result.reason)
    by_count = verify(path, use_head=False, expected_records=5)
    assert (by_count.ok, by_count.line) == (False, 4)
    by_hash = verify(path, use_head=False, expected_last_hash=anchor["last_hash"])
    assert not by_hash.ok and "is not the hash of any record" in by_hash.reason


def test_rehashed_last_record_is_caught_by_the_head(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, 3)
    lines = path.read_text().splitlines()
    _rewrite_with_new_hash(lines)  # the last record, so no later prev_hash exposes it
    path.write_text("\n".join(lines) + "\n")
    assert verify(path, use_head=False).ok
    result = verify(path)
    assert (result.ok, result.line) == (False, 3)
    assert re.search(
        r"record 3 has hash \w+, head sidecar .* expects \w+; history was rewritten", result.reason
    )


def test_expected_anchor_checks(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = write_ledger(path, 3)
    early = ledger.state_dict()
    write_ledger(path, 5)
    final = MixtureLedger(path).state_dict()
    assert verify(path, expected_records=5, expected_last_hash=final["last_hash"]).ok
    assert verify(path, expected_last_hash=final["last_hash"]).ok
    late = verify(path, expected_last_hash=early["last_hash"])
    assert (late.ok, late.line) == (False, 4)
    assert "lines 4..5 were appended after the anchor" in late.reason
    wrong = verify(path, expected_records=3, expected_last_hash=final["last_hash"])
    assert (wrong.ok, wrong.line) == (False, 3) and "record 3 has hash" in wrong.reason
    assert not verify(path, expected_records=4).ok


def test_head_sidecar_lag_and_absence(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = write_ledger(path, 2)
    head_after_two = head_path(path).read_text()
    write_ledger(path, 4)
    # A crash between appending record 3 and replacing the head leaves it one behind: a warning.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))
    head_path(path).write_text(head_after_two)
    result = verify(path)
    assert result.ok and len(result.warnings) == 1 and "lags the file by 1 record" in result.warnings[0]
    # Two records beyond the head were not written by the ledger: a failure.
    path.write_text("".join(lines))
    result = verify(path)
    assert (result.ok, result.line) == (False, 3) and "appended after the anchor" in result.reason
    head_path(path).unlink()
    result = verify(path)
    assert result.ok and "no head sidecar" in result.warnings[0]
    head_path(path).write_text("{not json")
    with pytest.raises(LedgerError, match=r"head sidecar .*\.head is corrupt"):
        verify(path)
    del ledger


def test_reopen_resumes_the_chain(tmp_path):
    path, reference = tmp_path / "ledger.jsonl", tmp_path / "reference.jsonl"
    write_ledger(reference, 5)
    first = write_ledger(path, 3)
    reopened = MixtureLedger(path)
    assert (len(reopened), reopened.last_hash, reopened.damage) == (3, first.last_hash, None)
    assert reopened.append(make_record(3))["prev_hash"] == first.last_hash
    reopened.append(make_record(4))
    assert path.read_bytes() == reference.read_bytes()
    assert verify(path).ok


def test_resume_protocol_reproduces_the_ledger(tmp_path):
    path, reference = tmp_path / "ledger.jsonl", tmp_path / "reference.jsonl"
    write_ledger(reference, 6)
    ledger = write_ledger(path, 3)
    checkpoint = ledger.state_dict()
    ledger.append(make_record(3))
    with open(path, "ab") as file:  # the run dies while writing record 4
        file.write(reference.read_bytes().splitlines(keepends=True)[4][:50])

    resumed = MixtureLedger(path)
    assert len(resumed) == 4 and resumed.damage.startswith("line 5: incomplete line")
    with pytest.raises(LedgerError, match=r"damaged at line 5.*truncate_to\(n\) with n <= 4"):
        resumed.append(make_record(4))
    with pytest.raises(LedgerError, match=r"truncate_to\(3, expected_last_hash="):
        resumed.load_state_dict(checkpoint)
    resumed.truncate_to(checkpoint["num_records"], expected_last_hash=checkpoint["last_hash"])
    resumed.load_state_dict(checkpoint)
    for i in range(3, 6):
        resumed.append(make_record(i))
    assert path.read_bytes() == reference.read_bytes()
    assert head_path(path).read_bytes() == head_path(reference).read_bytes()


def test_load_state_dict_refuses_mismatches(tmp_path):
    ledger = write_ledger(tmp_path / "ledger.jsonl", 4)
    state = ledger.state_dict()
    ledger.load_state_dict(state)
    with pytest.raises(LedgerError, match=r"holds 4 intact records but the checkpoint expects 9"):
        ledger.load_state_dict({"num_records": 9, "last_hash": "a" * 64})
    with pytest.raises(
        LedgerError, match=r"record 4 has hash .* checkpoint expects b{64}.*different history"
    ):
        ledger.load_state_dict({"num_records": 4, "last_hash": "b" * 64})
    with pytest.raises(LedgerError, match=r"1 record\(s\) written after the checkpoint.*truncate_to\(3"):
        ledger.load_state_dict(write_ledger(tmp_path / "other.jsonl", 3).state_dict())
    with pytest.raises(StateError, match=r"keys \('num_records', 'last_hash'\)"):
        ledger.load_state_dict({"num_records": 4})
    with pytest.raises(StateError, match=r"`last_hash` must be None exactly when `num_records` is 0"):
        ledger.load_state_dict({"num_records": 0, "last_hash": state["last_hash"]})
    assert len(ledger) == 4 and verify(ledger.path).ok  # nothing was changed on disk


def test_truncate_to_refuses_bad_requests(tmp_path):
    ledger = write_ledger(tmp_path / "ledger.jsonl", 4)
    with pytest.raises(LedgerError, match=r"`num_records`=5\) must be an int in \[0, 4\]"):
        ledger.truncate_to(5)
    with pytest.raises(LedgerError, match=r"record 2 has hash .* not the expected c{64}"):
        ledger.truncate_to(2, expected_last_hash="c" * 64)
    ledger.truncate_to(0)
    assert len(ledger) == 0 and ledger.path.read_bytes() == b"" and verify(ledger.path).ok
    assert ledger.append(make_record(0))["prev_hash"] == GENESIS_HASH


def test_fsync_after_each_append(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    ledger = MixtureLedger(path)
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        stat = os.fstat(fd)
        synced.append((stat.st_ino, stat.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    for i in range(3):
        ledger.append(make_record(i))
        # The ledger file itself was fsynced after the new line was written.
        assert (path.stat().st_ino, path.stat().st_size) in synced
        assert (head_path(path).stat().st_ino, head_path(path).stat().st_size) in synced
    synced.clear()
    write_ledger(tmp_path / "unsynced.jsonl", 2, fsync=False)
    assert synced == []


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"weights_after": {"code": float("nan"), "math": 0.5, "web": 0.5}}, r"weights_after\.code` is nan"),
        ({"influence": {"targets": ["t"], "domains": ["a"], "values": [[np.inf]]}}, r"influence\.values"),
        (
            {"solver": {**make_record(0)["solver"], "objective": np.float64("nan")}},
            r"solver\.objective.*null",
        ),
        ({"step": -1}, r"`step` must be a non-negative int"),
        ({"tokens_seen": 1.5}, r"`tokens_seen` must be a non-negative int"),
        ({"method": ""}, r"`method` must be a non-empty string"),
        ({"hash": "0"}, r"must not set \['hash'\]"),
        ({"weights_after": {"code": 1.0}}, r"must cover the same domains"),
        ({"weights_after": {"code": -0.1, "math": 0.6, "web": 0.5}}, r"weights_after\['code'\]` must be"),
        ({"influence": {"targets": ["t"], "domains": ["a", "b"], "values": [[1.0]]}}, r"\[1 targets x 2"),
        ({"influence": {"targets": ["t"], "values": [[1.0]]}}, r"lacks keys \['domains'\]"),
        ({"solver": {"status": "ok"}}, r"`solver` lacks keys \['reason'"),
        ({"note": object()}, r"record\.note` has type object"),
        ({"extra": {1: 2}}, r"non-string key 1"),
    ],
)
def test_append_rejects_inexact_or_malformed_records(tmp_path, change, pattern):
    ledger = MixtureLedger(tmp_path / "ledger.jsonl")
    with pytest.raises(LedgerError, match=pattern):
        ledger.append({**make_record(0), **change})
    assert len(ledger) == 0 and ledger.path.read_bytes() == b""


def test_append_rejects_missing_keys_and_going_backwards(tmp_path):
    ledger = write_ledger(tmp_path / "ledger.jsonl", 3)
    record = make_record(0)
    del record["weights_before"]
    with pytest.raises(LedgerError, match=r"lacks required keys \['weights_before'\]"):
        ledger.append(record)
    with pytest.raises(LedgerError, match=r"step=100, tokens_seen=409600 goes backwards"):
        ledger.append(make_record(1))


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "ledger.jsonl"
    first, second = MixtureLedger(path), MixtureLedger(path)
    first.append(make_record(0))
    with pytest.raises(LedgerError, match=r"changed on disk since it was opened \(0 -> \d+ bytes\)"):
        second.append(make_record(1))


def test_records_yields_the_intact_prefix_then_raises(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = write_ledger(path, 4)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2] + lines[3:]))
    seen = []
    with pytest.raises(LedgerError, match=r"damaged at line 3: .*deleted"):
        for record in ledger.records():
            seen.append(record["index"])
    assert seen == [0, 1]


def test_head_false_refuses_to_leave_a_sidecar_stale(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, 1)
    with pytest.raises(LedgerError, match=r"has a head sidecar .*\.head but was opened with head=False"):
        MixtureLedger(path, head=False)
    head_path(path).unlink()
    write_ledger(path, 3, head=False)
    assert not head_path(path).exists() and verify(path).ok


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(LedgerError, match=r"No ledger at .*missing\.jsonl"):
        verify(tmp_path / "missing.jsonl")


def test_commands_are_registered():
    assert {"tikmix_loader.ledger", "tikmix_loader.report"} <= set(cli.COMMAND_MODULES)


def test_cli_verify_exit_codes(tmp_path, run_cli, capsys):
    path = tmp_path / "ledger.jsonl"
    ledger = write_ledger(path, 4)
    assert run_cli(["ledger", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"OK, 4 records, steps 0..300, last hash {ledger.last_hash}" in out
    assert (
        run_cli(["ledger", "verify", str(path), "--expect-records", "4", "--expect-hash", ledger.last_hash])
        == 0
    )
    capsys.readouterr()
    assert run_cli(["ledger", "verify", str(path), "--expect-records", "5"]) == 2
    assert "truncated: the expected record count records 5 records" in capsys.readouterr().err

    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[0], lines[2], lines[1], lines[3]]))
    assert run_cli(["ledger", "verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("tikmix ledger: error: Ledger ")
        and "damaged at line 2: " in err
        and "reordered" in err
    )


MALFORMED_LINES = {
    "nan": '{"index":2,"step":NaN}',
    "infinity": '{"index":2,"step":Infinity}',
    "minus_infinity": '{"index":2,"step":-Infinity}',
    "overflowing_float": '{"index":2,"step":1e999}',
    "deep_nesting": "[" * 100_000 + "]" * 100_000,
    "deep_object_nesting": '{"a":' * 5_000 + "1" + "}" * 5_000,
    "array": "[1,2,3]",
    "number": "3",
    "string": '"record"',
    "null": "null",
    "huge_integer": '{"index":' + "9" * 5_000 + "}",
    "unhashable_fields": '{"version":1,"index":[],"hash":[],"prev_hash":{},"step":{},"tokens_seen":[],'
    '"method":[],"weights_before":1,"weights_after":1,"influence":null,"solver":null}',
    "binary": "\udcff",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_LINES))
def test_cli_verify_names_the_line_of_any_malformed_line(tmp_path, run_cli, capsys, name):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, 4, head=False)
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = MALFORMED_LINES[name] + "\n"
    path.write_bytes("".join(lines).encode("utf-8", errors="surrogateescape"))
    assert run_cli(["ledger", "verify", str(path)]) == 2  # a status, never a traceback
    err = capsys.readouterr().err
    assert "damaged at line 3: " in err and "Traceback" not in err


@pytest.mark.parametrize("content", ['{"num_records": NaN, "last_hash": null}', "[" * 100_000])
def test_cli_verify_malformed_head_sidecar(tmp_path, run_cli, capsys, content):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, 2)
    head_path(path).write_text(content)
    assert run_cli(["ledger", "verify", str(path)]) == 2
    assert re.search(r"head sidecar .*ledger\.jsonl\.head is corrupt", capsys.readouterr().err)
