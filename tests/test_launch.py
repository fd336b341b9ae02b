"""`fedhpc run`'s head lock: one head process per directory, stale Snakemake locks cleared."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedhpc.ops.run import acquire_head_lock

HOLD = "import sys, time; from fedhpc.ops.run import acquire_head_lock; acquire_head_lock(__import__('pathlib').Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"


def test_a_second_head_process_is_refused_while_the_first_lives(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"another fedhpc run is active in .* \(pid {holder.pid}\)"):
            acquire_head_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL released it: the kernel drops a dead process's flock.
    fd = acquire_head_lock(tmp_path)
    os.close(fd)


def test_a_lock_left_by_a_killed_snakemake_is_removed(tmp_path, capsys):
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("results/demo/x\n")
    fd = acquire_head_lock(tmp_path)
    os.close(fd)
    assert not locks.exists()
    assert "removing the Snakemake lock a killed run left" in capsys.readouterr().err


def test_no_message_when_there_is_nothing_stale(tmp_path, capsys):
    t0 = time.time()
    os.close(acquire_head_lock(tmp_path))
    assert capsys.readouterr().err == "" and time.time() - t0 < 1
