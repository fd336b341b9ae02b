"""Coordinator-signed ledger heads, and the whole ledger check: hash chain plus every signed head.

The hash chain finds an edited, inserted, moved or removed line, except lines removed from
the end: a shorter chain is still a valid chain. So at the end of every round the
coordinator signs the ledger's head (line count and the last line's hash) into
`rounds/rNNNN/ledger_head.json`. A truncated ledger is then shorter than a signed head, a
rewritten one disagrees with it at the head's line, and a head re-signed by anyone but the
coordinator does not verify. Deleting a head file is caught too: every round the coordinator
promoted (its verdicts and the next signed global model exist) must have one.
"""

from __future__ import annotations

import time
from pathlib import Path

from fedhpc.core.documents import DocumentError, check_document
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.trust.audit import LedgerCheck, ledger_tail, verify_ledger
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document

HEAD = "ledger_head.json"


def head_path(layout: RunLayout, r: int) -> Path:
    return layout.round_dir(r) / HEAD


def sign_head(layout: RunLayout, trust: TrustStore, run: str, r: int) -> dict:
    """Sign the ledger as it stands now as the head of round r (call after the round's last event)."""
    seq, last, _ = ledger_tail(layout.audit)
    doc = {"run": run, "round": r, "lines": seq, "hash": last, "time": time.time()}
    doc = sign_document(doc, COORDINATOR, trust.private_key(COORDINATOR))
    write_json(head_path(layout, r), doc)
    return doc


def _head_problem(path: Path, doc: dict, check: LedgerCheck, trust: TrustStore, run: str | None) -> str | None:
    try:
        verify_document(doc, trust, COORDINATOR, str(path))
        check_document("ledger_head", doc, str(path))
    except (SignatureError, DocumentError) as exc:
        return f"signed head is not the coordinator's: {exc}"
    if run is not None and doc["run"] != run:
        return f"{path}: a head of run {doc['run']!r}, not {run!r}"
    n = doc["lines"]
    if n > check.lines:
        return (
            f"the ledger has {check.lines} lines but the coordinator signed {n} at the end of round {doc['round']} "
            f"({path}): lines were removed from the end"
        )
    if n and check.hashes[n - 1] != doc["hash"]:
        return f"line {n} is not the line the coordinator signed at the end of round {doc['round']} ({path})"
    return None


def verify_run(root: str | Path, trust: TrustStore, run: str | None = None) -> LedgerCheck:
    """The chain of `root/audit.jsonl`, then every signed head under `root/rounds/` against it."""
    layout = RunLayout.of(root)
    check = verify_ledger(layout.audit)
    if not check.ok:
        return check
    heads = 0
    for r in layout.rounds_present():
        path = head_path(layout, r)
        if not path.exists():
            if layout.verdicts(r).exists() and layout.global_meta(r + 1).exists():
                return LedgerCheck(
                    False, check.lines, None, f"round {r} was promoted but its signed ledger head {path} is missing"
                )
            continue
        try:
            doc = read_json(path, max_bytes=1 << 16)
        except ValueError as exc:
            return LedgerCheck(False, check.lines, None, str(exc))
        problem = _head_problem(path, doc, check, trust, run)
        if problem:
            line = doc.get("lines") if isinstance(doc, dict) and isinstance(doc.get("lines"), int) else None
            return LedgerCheck(False, check.lines, line if line and line <= check.lines else None, problem)
        heads += 1
    return LedgerCheck(True, check.lines, hashes=check.hashes, heads=heads)
