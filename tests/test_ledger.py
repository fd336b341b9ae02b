"""Signed ledger heads: an edited line, a removed line (also from the end), a rewritten chain and a
re-signed fake head are all caught by `fedhpc audit verify`."""

from __future__ import annotations

import json

import pytest

from fedhpc.cli.main import main
from fedhpc.core.files import read_json, write_json
from fedhpc.trust.audit import GENESIS, AuditLog, _digest
from fedhpc.trust.ledger import head_path, sign_head, verify_run
from fedhpc.trust.signing import COORDINATOR, sign_document
from tests.test_verify import RoundBuilder


@pytest.fixture()
def run(tmp_path):
    """Two promoted rounds, each ending with the coordinator's signed head, and the keys of a site."""
    b = RoundBuilder(tmp_path, ["lumi"], r=2)
    log = AuditLog(b.layout.audit)
    for r in range(2):
        for i in range(3):
            log.append("step", round=r, i=i)
        write_json(b.layout.verdicts(r), {"round": r, "accepted": [], "rejected": {}})
        sign_head(b.layout, b.trust, b.run, r)
    return b


def rows(b) -> list[str]:
    return b.layout.audit.read_text().splitlines()


def put(b, lines: list[str]) -> None:
    b.layout.audit.write_text("".join(x + "\n" for x in lines))


def check(b):
    return verify_run(b.layout.root, b.trust, b.run)


def test_an_intact_ledger_with_its_heads_verifies(run):
    c = check(run)
    assert c.ok and c.lines == 6 and c.heads == 2
    assert read_json(head_path(run.layout, 1))["lines"] == 6 and read_json(head_path(run.layout, 0))["lines"] == 3


def test_an_edited_line_is_caught(run):
    lines = rows(run)
    body = json.loads(lines[1])
    body["i"] = 7
    lines[1] = json.dumps(body, sort_keys=True)
    put(run, lines)
    c = check(run)
    assert not c.ok and c.bad_line == 2 and "edited" in c.reason


def test_a_removed_line_is_caught(run):
    lines = rows(run)
    del lines[2]
    put(run, lines)
    c = check(run)
    assert not c.ok and c.bad_line == 3 and "a line was removed" in c.reason


@pytest.mark.parametrize("n", [1, 3, 6])
def test_lines_removed_from_the_end_are_caught_by_the_signed_head(run, n):
    put(run, rows(run)[:-n])
    c = check(run)
    assert not c.ok
    assert "lines were removed from the end" in c.reason and f"has {6 - n} lines but the coordinator signed" in c.reason


def rechain(lines: list[str]) -> list[str]:
    """What an attacker with write access does after editing: recompute every hash, so the chain is valid."""
    prev, out = GENESIS, []
    for i, line in enumerate(lines):
        body = json.loads(line)
        body.pop("hash")
        body.update(seq=i, prev=prev)
        body["hash"] = prev = _digest(prev, body)
        out.append(json.dumps(body, sort_keys=True))
    return out


def test_a_rewritten_chain_is_caught_where_the_coordinator_signed(run):
    lines = rows(run)
    body = json.loads(lines[4])
    body["i"] = 99
    lines[4] = json.dumps(body, sort_keys=True)
    put(run, rechain(lines))
    c = check(run)
    assert not c.ok and c.bad_line == 6
    assert "line 6 is not the line the coordinator signed at the end of round 1" in c.reason


def fake_head(b, lines: int, signer: str, key_of: str) -> None:
    """Truncate the ledger to `lines` and re-sign the last round's head to match."""
    put(b, rows(b)[:lines])
    doc = {k: v for k, v in read_json(head_path(b.layout, 1)).items() if k != "signature"}
    doc.update(lines=lines, hash=json.loads(rows(b)[-1])["hash"])
    write_json(head_path(b.layout, 1), sign_document(doc, signer, b.trust.private_key(key_of)))


def test_a_fake_head_signed_by_a_site_claiming_to_be_the_coordinator_is_caught(run):
    fake_head(run, 4, COORDINATOR, "lumi")
    c = check(run)
    assert not c.ok and "signed head is not the coordinator's" in c.reason and "signature does not verify" in c.reason


def test_a_fake_head_signed_openly_by_a_site_is_caught(run):
    fake_head(run, 4, "lumi", "lumi")
    c = check(run)
    assert not c.ok and "signed by 'lumi', expected 'coordinator'" in c.reason


def test_a_deleted_head_of_a_promoted_round_is_caught(run):
    put(run, rows(run)[:4])
    head_path(run.layout, 1).unlink()
    c = check(run)
    assert not c.ok and "round 1 was promoted but its signed ledger head" in c.reason


def test_a_head_of_another_run_is_caught(run):
    doc = {k: v for k, v in read_json(head_path(run.layout, 0)).items() if k != "signature"}
    doc["run"] = "other"
    write_json(head_path(run.layout, 0), sign_document(doc, COORDINATOR, run.trust.private_key(COORDINATOR)))
    assert "a head of run 'other', not 't'" in check(run).reason


def test_cli_audit_verify_checks_heads(run, capsys):
    root = str(run.layout.root)
    assert main(["audit", "verify", root]) == 0
    assert "intact, 6 events, 2 signed heads" in capsys.readouterr().out
    put(run, rows(run)[:-1])
    assert main(["audit", "verify", root]) == 1
    err = capsys.readouterr().err
    assert "audit.jsonl: BROKEN (5 lines): the ledger has 5 lines but the coordinator signed 6" in err


@pytest.mark.e2e
def test_a_real_federation_signs_a_head_every_round(finished, capsys):
    _, cfg, run_dir = finished
    assert main(["audit", "verify", str(run_dir)]) == 0
    assert f"{cfg['rounds']['count']} signed heads" in capsys.readouterr().out
