"""The hash-chained audit ledger: tampering is found at its first line, crashes are repaired, appends are safe."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from fedhpc.cli.main import main
from fedhpc.trust.audit import GENESIS, AuditLog, LedgerCheck, _digest, verify_ledger

N = 8


@pytest.fixture()
def ledger(tmp_path: Path) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(N):
        log.append("step", i=i, who=f"site{i % 3}")
    return log.path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def write_lines(path: Path, rows: list[str]) -> None:
    path.write_text("".join(r + "\n" for r in rows))


def test_an_intact_ledger_verifies_and_chains_from_genesis(ledger):
    check = verify_ledger(ledger)
    assert (check.ok, check.lines, check.bad_line, check.reason) == (True, N, None, "")
    events = AuditLog(ledger).events()
    assert [e["seq"] for e in events] == list(range(N))
    assert [e["i"] for e in events] == list(range(N))
    assert events[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(events, events[1:]))


def test_a_missing_ledger_does_not_verify(tmp_path):
    check = verify_ledger(tmp_path / "audit.jsonl")
    assert not check.ok and "does not exist" in check.reason


# Each tamper takes the ledger's lines and the 1-based line k; it returns the new lines.
def edit(rows, k):
    body = json.loads(rows[k - 1])
    body["who"] = "mallory"
    rows[k - 1] = json.dumps(body, sort_keys=True)
    return rows


def delete(rows, k):
    del rows[k - 1]
    return rows


def swap(rows, k):
    rows[k - 1], rows[k] = rows[k], rows[k - 1]
    return rows


def insert_copy(rows, k):
    """A forged line: a copy of line k with another value, inserted before it."""
    body = json.loads(rows[k - 1])
    body["who"] = "mallory"
    rows.insert(k - 1, json.dumps(body, sort_keys=True))
    return rows


TAMPERS = {"edit": edit, "delete": delete, "swap": swap, "insert": insert_copy}


@pytest.mark.parametrize("k", [1, 4, N - 1])
@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampering_is_caught_at_the_first_bad_line(ledger, tamper, k):
    write_lines(ledger, TAMPERS[tamper](lines(ledger), k))
    check = verify_ledger(ledger)
    assert not check.ok
    assert check.bad_line == k, check


def test_editing_the_last_line_is_caught(ledger):
    write_lines(ledger, edit(lines(ledger), N))
    check = verify_ledger(ledger)
    assert (check.ok, check.bad_line, check.reason) == (False, N, "content does not match its hash (edited)")


def test_the_reason_says_what_kind_of_damage_it_is(ledger):
    rows = lines(ledger)
    write_lines(ledger, delete(list(rows), 3))
    assert "sequence number 3, expected 2" in verify_ledger(ledger).reason
    write_lines(ledger, edit(list(rows), 3))
    assert verify_ledger(ledger).reason == "content does not match its hash (edited)"
    write_lines(ledger, rows[:2] + ["{not json"] + rows[2:])
    assert (verify_ledger(ledger).bad_line, verify_ledger(ledger).reason) == (3, "not a JSON object")


def test_a_forged_line_with_a_valid_hash_is_caught_where_the_chain_breaks(ledger):
    """Whoever can write the file can compute sha256: a forged line that chains to its predecessor
    is itself consistent, so the first bad line is the genuine one after it."""
    rows = lines(ledger)
    prev = json.loads(rows[2])
    forged = {
        "seq": prev["seq"] + 1,
        "time": prev["time"],
        "event": "step",
        "i": 99,
        "who": "mallory",
        "prev": prev["hash"],
    }
    forged["hash"] = _digest(prev["hash"], forged)
    rows.insert(3, json.dumps(forged, sort_keys=True))
    write_lines(ledger, rows)
    check = verify_ledger(ledger)
    assert not check.ok and check.bad_line == 5


def test_a_torn_last_line_is_repaired_on_the_next_append(ledger):
    intact = ledger.read_bytes()
    torn = b'{"event": "step", "i": 8, "prev": "' + b"ab" * 10  # crash mid-write: no newline
    ledger.write_bytes(intact + torn)
    check = verify_ledger(ledger)
    assert not check.ok and check.bad_line == N + 1  # the torn line is visible until repaired

    AuditLog(ledger).append("after.crash", note="x")
    assert ledger.read_bytes().startswith(intact)
    events = AuditLog(ledger).events()
    assert [e["event"] for e in events[N:]] == ["ledger.repaired", "after.crash"]
    assert events[N]["dropped_bytes"] == len(torn) and events[N]["seq"] == N
    assert events[N + 1]["seq"] == N + 1 and events[N + 1]["prev"] == events[N]["hash"]
    assert verify_ledger(ledger) == LedgerCheck(True, N + 2)


def test_a_ledger_torn_in_its_first_line_is_repaired(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"seq": 0, "ev')
    AuditLog(path).append("start")
    assert [e["event"] for e in AuditLog(path).events()] == ["ledger.repaired", "start"]
    assert verify_ledger(path).ok and verify_ledger(path).lines == 2


def test_an_append_reads_the_end_of_the_ledger_not_all_of_it(ledger, tmp_path):
    """Every stage appends; a run of hundreds of rounds must not read its whole ledger each time.
    Here the ledger's lines follow a 64 GiB hole (sparse: no disk), more than this machine's memory:
    an append that read the whole file could not even hold it."""
    long_run = tmp_path / "long" / "audit.jsonl"
    long_run.parent.mkdir()
    hole = 64 << 30
    with open(long_run, "wb") as fh:
        fh.truncate(hole)
        fh.seek(hole)
        fh.write(ledger.read_bytes() + b'{"seq": 8, "torn')  # and a crash tore the last write
    repaired = AuditLog(long_run).append("after.crash")
    last = lines(ledger)[-1]
    with open(long_run, "rb") as fh:
        fh.seek(hole)
        tail = [json.loads(x) for x in fh.read().splitlines()]
    assert [e["event"] for e in tail[N:]] == ["ledger.repaired", "after.crash"]
    assert tail[N]["prev"] == json.loads(last)["hash"] and tail[N]["seq"] == N
    assert repaired == tail[-1] and repaired["seq"] == N + 1 and repaired["prev"] == tail[N]["hash"]


def _append_many(path: str, who: int, n: int, barrier) -> None:
    barrier.wait()  # everyone starts together, so appends really interleave
    log = AuditLog(path)
    for i in range(n):
        log.append("worker.step", worker=who, i=i)


def test_concurrent_appends_from_several_processes_keep_the_chain(tmp_path):
    procs, per = 4, 50
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs)
    workers = [ctx.Process(target=_append_many, args=(str(path), w, per, barrier)) for w in range(procs)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=60)
    assert [p.exitcode for p in workers] == [0] * procs

    check = verify_ledger(path)
    assert check.ok and check.lines == procs * per, check
    events = AuditLog(path).events()
    assert [e["seq"] for e in events] == list(range(procs * per))
    # Every append landed exactly once, and each worker's appends stayed in its own order.
    for w in range(procs):
        assert [e["i"] for e in events if e["worker"] == w] == list(range(per))


def test_cli_audit_verify_exit_codes_and_line_number(ledger, capsys):
    run_dir = ledger.parent
    assert main(["audit", "verify", str(run_dir)]) == 0
    assert f"intact, {N} events" in capsys.readouterr().out

    write_lines(ledger, swap(lines(ledger), 5))
    assert main(["audit", "verify", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "BROKEN at line 5:" in err and "sequence number" in err
