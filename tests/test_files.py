"""Atomic writes: a writer killed mid-write leaves a part that the next write of its file removes, and no other."""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from fedhpc.core.files import atomic_path, write_json


def _hold_a_write(path: str, started, release) -> None:
    """Open an atomic write of `path`, say so and wait: killed here, the write is torn."""
    with atomic_path(path) as tmp:
        tmp.write_text("half")
        started.set()
        release.wait(60)
        tmp.write_text('{"by": "the holder"}')


def _writer(target: Path):
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_a_write, args=(str(target), started, release))
    proc.start()
    assert started.wait(30), "the writer never opened its write"
    return proc, release


def _parts(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.part"))


def test_the_next_write_removes_the_part_of_a_writer_killed_mid_write(tmp_path):
    target = tmp_path / "aggregate.json"
    proc, _ = _writer(target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert len(_parts(target)) == 1 and str(proc.pid) in _parts(target)[0].name

    write_json(target, {"round": 0})

    assert _parts(target) == []
    assert target.read_text().strip().startswith("{")


def test_a_live_writers_part_of_the_same_file_and_other_files_parts_stay(tmp_path):
    target = tmp_path / "status.json"
    proc, release = _writer(target)
    other = tmp_path / ".status.json.tmp.part"  # not named by a writer: nobody can tell it is dead
    other.write_text("x")
    foreign = tmp_path / ".status.json.another-node.1.abcdefgh.part"  # its host's pids cannot be asked
    foreign.write_text("x")
    sibling = tmp_path / ".receipt.json.x.part"
    sibling.write_text("x")
    try:
        write_json(target, {"by": "the second writer"})
        assert [p for p in _parts(target) if str(proc.pid) in p.name], "a live writer's part was removed"
    finally:
        release.set()
        proc.join(30)
    assert proc.exitcode == 0, "the live writer could not finish its write"
    assert target.read_text() == '{"by": "the holder"}'
    assert other.exists() and foreign.exists() and sibling.exists()
