"""`fedhpc status` and `fedhpc run`'s progress lines: round wall times, sites' steps and speed,
deadlines and the ETA, read from the blackboard of a finished run and of hand-made states."""

from __future__ import annotations

import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedhpc.core.files import write_json
from fedhpc.core.layout import RunLayout
from fedhpc.ops.run import ProgressLines, run
from fedhpc.stages import progress
from fedhpc.stages.failures import failure_path
from fedhpc.stages.progress import compact_line, span
from fedhpc.stages.status import format_status, snapshot
from tests.workflow_util import BIN, env, events, tiny_config, write_config

T0 = 1_800_000_000.0
SITES = ("a100", "laptop", "lumi")


class Board:
    """A run directory written by hand, file by file, as the stages would leave it."""

    def __init__(self, root: Path, rounds: int = 6, deadline_minutes: float = 30, exchange: dict | None = None):
        self.layout = RunLayout(root)
        cfg = {"rounds": {"count": rounds, "deadline_minutes": deadline_minutes}, "training": {"log_every": 10}}
        write_json(self.layout.config, {**cfg, **({"exchange": exchange} if exchange else {})})

    def event(self, t: float, event: str, **fields) -> None:
        self.layout.audit.parent.mkdir(parents=True, exist_ok=True)
        with open(self.layout.audit, "a") as fh:
            fh.write(json.dumps({"time": t, "event": event, **fields}) + "\n")

    def plan(self, r: int, created: float, participants=SITES) -> None:
        write_json(self.layout.plan(r), {"round": r, "created": created, "sites": {s: {} for s in SITES},
                                         "participants": list(participants)})  # fmt: skip
        self.event(created, "round.planned", round=r)

    def train(self, r: int, site: str, t: float, *records: tuple[int, int, float, float]) -> None:
        """train.started, then metrics records (step, steps, tokens/s, time)."""
        self.event(t, "train.started", round=r, site=site)
        self.layout.site_dir(r, site).mkdir(parents=True, exist_ok=True)
        with open(self.layout.metrics(r, site), "a") as fh:
            for step, steps, tps, when in records:
                fh.write(json.dumps({"round": r, "site": site, "step": step, "steps": steps, "loss": 3.0,
                                     "tokens_per_s": tps, "time": when}) + "\n")  # fmt: skip

    def publish(self, r: int, site: str, steps: int, tps: float, t: float) -> None:
        write_json(self.layout.receipt(r, site), {"steps": steps, "tokens_per_second": tps, "finished_at": t})
        self.event(t, "update.published", round=r, site=site)

    def close(self, r: int, missing=(), reason: str = "no update by the deadline", t: float = 0) -> None:
        write_json(self.layout.arrivals(r), {"round": r, "missing": list(missing)})
        for site in missing:
            self.event(t, "site.dropped", round=r, site=site, reason=reason)

    def end(self, r: int, t: float, loss: float) -> None:
        accepted = [s for s in SITES if self.layout.receipt(r, s).exists()]
        write_json(self.layout.verdicts(r), {"accepted": accepted, "rejected": []})
        # The ledger's event first, unlike promote: a look between the two writes would date the
        # round by the model file's (real) time instead of this made-up one.
        self.event(t, "global.published", round=r + 1, from_round=r)
        write_json(self.layout.global_eval(r + 1), {"loss": loss})
        write_json(self.layout.global_meta(r + 1), {"round": r + 1, "source": "aggregate"})

    def done_round(self, r: int, start: float, wall: float) -> None:
        self.plan(r, start)
        for s in SITES:
            self.train(r, s, start + 1, (100, 100, 1000.0, start + wall / 2))
            self.publish(r, s, 100, 1000.0, start + wall / 2)
        self.close(r, t=start + wall / 2)
        self.end(r, start + wall, 3.0 - r / 10)


def three_done_and_one_training(root: Path, rounds: int = 6) -> tuple[Board, float]:
    """Rounds 0-2 done in 100, 140 and 120 s; round 3 planned at the return value, a100 training
    (30 of 120 steps at 5,000 tokens/s, last record at +100 s), lumi published, laptop not started."""
    b = Board(root, rounds=rounds)
    b.done_round(0, T0, 100)
    b.done_round(1, T0 + 100, 140)
    b.done_round(2, T0 + 240, 120)
    start = T0 + 360
    b.plan(3, start)
    b.train(3, "a100", start + 5, (10, 120, 4800.0, start + 60), (30, 120, 5000.0, start + 100))
    b.train(3, "lumi", start + 5, (120, 120, 9000.0, start + 90))
    b.publish(3, "lumi", 120, 9000.4, start + 90)
    return b, start


def status_text(layout: RunLayout, now: float) -> str:
    return format_status(*snapshot(layout, now), now)


def table(text: str) -> dict[str, list[str]]:
    """The status table's rows by round name, cut at two or more spaces."""
    import re

    return {line.split()[0]: re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.startswith("r0")}


def test_a_round_in_training_shows_wall_times_steps_deadline_and_eta(tmp_path):
    b, start = three_done_and_one_training(tmp_path)
    text = status_text(b.layout, start + 130)
    rows = table(text)
    assert rows["r0000"] == ["r0000", "accepted", "accepted", "accepted", "done", "1 min 40 s", "3.0000"]
    assert rows["r0001"][4:] == ["done", "2 min 20 s", "2.9000"]
    assert rows["r0002"][4:] == ["done", "2 min 00 s", "2.8000"]
    assert rows["r0003"] == ["r0003", "training", "planned", "published", "training", "2 min 10 s", "in 27 min 50 s"]
    lines = text.splitlines()
    detail = lines[lines.index("round 3 (training, so far 2 min 10 s; deadline in 27 min 50 s):") + 1 :]
    assert detail[:3] == [
        "  a100    training 30/120 5,000 tokens/s, last record 30 s ago",
        "  laptop  planned",
        "  lumi    published 120/120 steps 9,000 tokens/s",
    ]
    # ETA = rounds left (6 - 3 done) × the median of the done rounds' wall times (100, 140, 120 s).
    assert detail[3] == "federation: 3 of 6 rounds done; ETA 6 min 00 s (3 rounds left × median 2 min 00 s)"
    line = compact_line(*snapshot(b.layout, start + 130), start + 130)
    assert line == (
        "fedhpc: round 3/6 training (2 min 10 s): a100 training 30/120 5,000 tokens/s, laptop planned, "
        "lumi published 9,000 tokens/s; deadline in 27 min 50 s; ETA 6 min 00 s (3 rounds left × median 2 min 00 s)"
    )


def test_a_round_past_its_deadline_says_so_and_a_failed_round_stops_the_eta(tmp_path):
    b, start = three_done_and_one_training(tmp_path)
    now = start + 31 * 60
    b.event(start + 30 * 60, "round.waiting_for_quorum", round=3, arrived=["lumi"], needed=3)
    text = status_text(b.layout, now)
    assert table(text)["r0003"][4:] == ["waiting for quorum", "31 min 00 s", "passed 1 min 00 s ago"]
    # The last record is 29 min 20 s old: a stuck site is visible without looking at any process.
    assert "  a100    training 30/120 5,000 tokens/s, last record 29 min 20 s ago" in text.splitlines()
    b.event(now, "round.no_quorum", round=3, arrived=["lumi"], missing=["a100", "laptop"], needed=3)
    text = status_text(b.layout, now)
    assert table(text)["r0003"][4:] == ["failed: no quorum", "31 min 00 s"]
    assert text.splitlines()[-1] == "federation: 3 of 6 rounds done; stopped: round 3 failed"


def test_a_round_with_a_dropped_site_names_it_and_why(tmp_path):
    b, start = three_done_and_one_training(tmp_path)
    b.publish(3, "a100", 120, 5100.0, start + 200)
    # laptop's job ran after the coordinator had closed the round: its status record says so.
    write_json(b.layout.site_dir(3, "laptop") / "status.json", {"state": "round-closed", "detail": "closed first"})
    b.close(3, missing=["laptop"], t=start + 300)
    text = status_text(b.layout, start + 310)
    assert table(text)["r0003"] == ["r0003", "published", "dropped", "published", "verifying", "5 min 10 s"]
    assert "  laptop  dropped (closed first)" in text.splitlines()
    (b.layout.site_dir(3, "laptop") / "status.json").unlink()
    assert "  laptop  dropped (no update by the deadline)" in status_text(b.layout, start + 310).splitlines()
    b.end(3, start + 400, 2.5)
    text = status_text(b.layout, start + 500)
    assert table(text)["r0003"][1:] == ["accepted", "dropped", "accepted", "done", "6 min 40 s", "2.5000"]
    # Walls 100, 140, 120, 400 s: median 130 s, two rounds left.
    assert text.splitlines()[-1] == "federation: 4 of 6 rounds done; ETA 4 min 20 s (2 rounds left × median 2 min 10 s)"


def test_a_failed_site_job_shows_its_failure_record(tmp_path):
    b, start = three_done_and_one_training(tmp_path)
    # What a failed attempt of fedhpc train leaves (fedhpc.stages.failures.record_failure), written by hand.
    failure = {"round": 3, "site": "laptop", "error": "TrainingError: 18 training sequences cannot fill one step",
               "deterministic": True, "attempt": 1, "attempts": 2, "final": True}  # fmt: skip
    write_json(failure_path(b.layout, 3, "laptop"), failure)
    write_json(failure_path(b.layout, 3, "a100"), {**failure, "site": "a100", "error": "killed by signal 9",
                                                   "deterministic": False, "final": False})  # fmt: skip
    text = status_text(b.layout, start + 130)
    assert table(text)["r0003"][1:4] == ["training", "failed", "published"]
    lines = text.splitlines()
    assert (
        "  laptop  failed (attempt 1 of 2 failed: TrainingError: 18 training sequences cannot fill one step)" in lines
    )
    assert (
        "  a100    training 30/120 5,000 tokens/s, last record 30 s ago (attempt 1 of 2 failed, to be retried: "
        "killed by signal 9)" in lines
    )
    # The coordinator closes the round without the site at once: dropped, and still why.
    b.close(3, missing=["laptop"], reason="its job failed for good", t=start + 140)
    text = status_text(b.layout, start + 150)
    assert table(text)["r0003"][2] == "dropped"
    assert "  laptop  dropped (attempt 1 of 2 failed: TrainingError: 18 training sequences cannot fill one step)" in (
        text.splitlines()
    )


def test_a_sites_own_directory_shows_its_own_progress(tmp_path):
    b = Board(tmp_path, rounds=2, exchange={"role": "site", "site": "lumi", "kind": "rsync"})
    b.plan(0, T0)
    b.train(0, "lumi", T0 + 2, (20, 80, 7000.0, T0 + 40))
    text = status_text(b.layout, T0 + 45)
    assert table(text)["r0000"] == ["r0000", "training", "training", "45 s", "in 29 min 15 s"]
    assert "  lumi  training 20/80 7,000 tokens/s, last record 5 s ago" in text.splitlines()
    # The next round's plan, pulled from the hub, dates the end of round 0 at the site.
    write_json(b.layout.global_meta(1), {"round": 1, "source": "aggregate"})
    b.plan(1, T0 + 70)
    text = status_text(b.layout, T0 + 80)
    assert table(text)["r0000"][2:4] == ["done", "1 min 10 s"]
    assert text.splitlines()[-1] == "federation: 1 of 2 rounds done; ETA 1 min 10 s (1 round left × median 1 min 10 s)"


def test_finished_federation_shows_each_rounds_wall_time_and_its_sites_steps(finished):
    _, cfg, run_dir = finished
    out = subprocess.run([str(BIN / "fedhpc"), "status", str(run_dir)], capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    rows, ev = table(out.stdout), events(run_dir)
    walls = []
    for r in range(cfg["rounds"]["count"]):
        created = json.loads((run_dir / "rounds" / f"r{r:04d}" / "plan.json").read_text())["created"]
        ended = next(e["time"] for e in ev if e["event"] == "global.published" and e.get("from_round") == r)
        walls.append(ended - created)
        assert rows[f"r{r:04d}"][4:6] == ["done", span(ended - created)]
    last = cfg["rounds"]["count"] - 1
    for site in cfg["sites"]:
        receipt = json.loads((run_dir / "rounds" / f"r{last:04d}" / "sites" / site / "receipt.json").read_text())
        shown = f"  {site:<6}  accepted {receipt['steps']}/{receipt['steps']} steps {receipt['tokens_per_second']:,.0f} tokens/s"
        assert shown in out.stdout.splitlines()
    assert (
        out.stdout.splitlines()[-1] == f"federation: all 2 rounds done, median round {span(statistics.median(walls))}"
    )


def test_train_log_gets_a_plain_line_every_log_every_steps(finished):
    """The jobs of the finished run (real `fedhpc train` under Snakemake) wrote them to their train.log."""
    _, cfg, run_dir = finished
    every = cfg["training"]["log_every"]
    for site in cfg["sites"]:
        records = [
            json.loads(x) for x in (run_dir / "rounds/r0001/sites" / site / "metrics.jsonl").read_text().splitlines()
        ]
        log = (run_dir / "logs/train" / f"r0001-{site}.log").read_text().splitlines()
        lines = [x for x in log if x.startswith(f"round 1 {site}: step ")]
        steps = records[-1]["steps"]
        assert [int(x.split()[4].split("/")[0]) for x in lines] == [
            s for s in range(1, steps + 1) if s % every == 0 or s == steps
        ]
        for line, rec in zip(lines, records, strict=True):
            assert line.startswith(f"round 1 {site}: step {rec['step']}/{steps}, loss {rec['loss']:.4f}, lr ")
            assert f"{rec['tokens_per_s']:,.0f} tokens/s" in line


def _watch(layout: RunLayout) -> subprocess.Popen:
    cmd = [str(BIN / "fedhpc"), "status", str(layout.root), "--watch", "--interval", "0.2"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def _read_block(proc: subprocess.Popen) -> list[str]:
    block = []
    while not (block and block[-1].startswith("federation:")):
        line = proc.stdout.readline()
        assert line, f"watch ended early: {proc.stderr.read()}"
        if line.strip():
            block.append(line.rstrip("\n"))
    return block


def test_watch_refreshes_and_exits_when_the_run_is_done(tmp_path):
    b, start = three_done_and_one_training(tmp_path, rounds=4)
    proc = _watch(b.layout)
    try:
        first = _read_block(proc)
        assert first[-1].startswith("federation: 3 of 4 rounds done; ETA 2 min 00 s")
        b.train(3, "a100", start + 5, (60, 120, 5000.0, time.time()))
        deadline = time.time() + 30  # blocks printed before the step was written may still be in the pipe
        while not any("a100    training 60/120" in x for x in _read_block(proc)):
            assert time.time() < deadline, "the watch never showed a100's step"
        b.publish(3, "a100", 120, 5000.0, start + 200)
        b.publish(3, "laptop", 120, 5000.0, start + 200)
        b.close(3)
        b.end(3, start + 300, 2.5)
        assert proc.wait(timeout=30) == 0
        rest = [x for x in proc.stdout.read().splitlines() if x]
        assert rest[-1] == "federation: all 4 rounds done, median round 2 min 10 s"
    finally:
        proc.kill()
        proc.wait()


def test_watch_stops_on_ctrl_c(tmp_path):
    b, _ = three_done_and_one_training(tmp_path)
    proc = _watch(b.layout)
    try:
        _read_block(proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_progress_lines_print_when_a_round_ends_and_stop_cleanly(tmp_path):
    b, start = three_done_and_one_training(tmp_path)
    out = io.StringIO()
    lines = ProgressLines(lambda: b.layout, every=3600, poll=0.05, out=out)
    lines.start()
    deadline = time.time() + 20
    while out.getvalue().count("\n") < 1 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # nothing changed: no second line before `every` seconds
    assert out.getvalue().count("\n") == 1 and "round 3/6 training" in out.getvalue()
    b.publish(3, "a100", 120, 5000.0, start + 200)
    b.publish(3, "laptop", 120, 5000.0, start + 200)
    b.close(3)
    b.end(3, start + 300, 2.5)
    while "round 3/6 done" not in out.getvalue() and time.time() < deadline:
        time.sleep(0.05)
    lines.stop()
    assert not lines.is_alive()
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("fedhpc: round 3/6 done (5 min 00 s)") and last.endswith(
        "ETA 4 min 20 s (2 rounds left × median 2 min 10 s)"
    )


FAKE_SNAKEMAKE = """#!{python}
import json, sys, time
from pathlib import Path
run = Path(sys.argv[sys.argv.index("--directory") + 1]) / "results" / "tiny"

def printed(state):  # the head has printed a progress line of this state (or 30 s passed)
    deadline = time.time() + 30
    while not (Path({marks!r}) / state).exists() and time.time() < deadline:
        time.sleep(0.05)

printed("training")
(run / "rounds/r0001/global").mkdir(parents=True)
(run / "rounds/r0001/global/model.json").write_text(json.dumps({{"source": "aggregate"}}))
(run / "rounds/r0001/global/eval.json").write_text(json.dumps({{"loss": 2.5}}))
with open(run / "audit.jsonl", "a") as fh:
    fh.write(json.dumps({{"time": time.time(), "event": "global.published", "round": 1, "from_round": 0}}) + "\\n")
printed("done")
sys.exit(3)
"""


def test_fedhpc_run_prints_progress_while_snakemake_runs(tmp_path, monkeypatch, capsys):
    """`fedhpc run` with a stand-in Snakemake that ends round 0 once the head printed that it trains,
    and exits once the head printed that it is done."""
    cfg = tiny_config(tmp_path, rounds=2)
    write_config(tmp_path, cfg)
    b = Board(Path(cfg["output_dir"]) / cfg["run"], rounds=2)
    b.plan(0, time.time())
    bindir = tmp_path / "bin"
    bindir.mkdir()
    marks = tmp_path / "printed"
    marks.mkdir()
    real = progress.compact_line

    def marked(rows, fed, now):
        line = real(rows, fed, now)
        for state in ("training", "done"):
            if line.startswith(f"fedhpc: round 0/2 {state}"):
                (marks / state).touch()
        return line

    monkeypatch.setattr(progress, "compact_line", marked)
    (bindir / "snakemake").write_text(FAKE_SNAKEMAKE.format(python=sys.executable, marks=str(marks)))
    (bindir / "snakemake").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = run("profiles/local", str(tmp_path / "config.yaml"), str(tmp_path), [], progress_every=0.2)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert code == 3  # Snakemake's own exit code
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fedhpc: round 0/2")]
    assert err[0].startswith("fedhpc: round 0/2 training") and "deadline in" in err[0]
    assert err[-1].startswith("fedhpc: round 0/2 done") and "1 round left" in err[-1]


def test_a_sites_step_is_its_metrics_last_complete_record_however_long_the_round(tmp_path):
    # A record may be longer than any fixed tail (this one 100 kB, a task's own metrics); a record
    # being written has no newline yet.
    path = tmp_path / "metrics.jsonl"
    records = [{"step": i, "loss": 1.0 / (i + 1), "note": "x" * 300} for i in range(399)]
    records.append({"step": 399, "loss": 0.01, "per_token": [0.5] * 20_000})
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 400, "lo')
    assert progress.last_record(path) == records[-1]
    path.write_text('{"step": 0, "lo')
    assert progress.last_record(path) is None
    assert progress.last_record(tmp_path / "none.jsonl") is None
