"""The warm process: a job's `fedhpc` run by a fork of it behaves as the job's own process would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedhpc.cli import warm
from tests.workflow_util import BIN, run_workflow, summary, tiny_config, write_config

FEDHPC = str(BIN / "fedhpc")
VALID = Path(__file__).resolve().parents[1] / "config.yaml"


def ready(logs: Path, pattern: str = "warm-*.log") -> Path:
    """The warm process's log, once it says the process is ready."""
    deadline = time.time() + 60
    while not (found := [p for p in logs.glob(pattern) if "ready in" in p.read_text()]):
        assert time.time() < deadline, "the warm process never got ready"
        time.sleep(0.1)
    return found[0]


@pytest.fixture
def server(tmp_path):
    """A warm process as `fedhpc run` starts one; yields (its jobs' environment, its log)."""
    logs = tmp_path / "logs"
    with warm.started(logs) as env:
        yield {**os.environ, **env}, ready(logs)


def served(log: Path) -> list[str]:
    return [line.split(": ", 1)[1] for line in log.read_text().splitlines() if " pid " in line and ": fedhpc" in line]


def child_of(log: Path, argv: str, timeout: float = 10) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in log.read_text().splitlines():
            if line.endswith(f": fedhpc {argv}") and " pid " in line:
                return int(line.split(" pid ")[1].split(":")[0])
        time.sleep(0.05)
    raise AssertionError(f"`fedhpc {argv}` was not served:\n{log.read_text()}")


def test_a_served_command_has_the_jobs_directory_streams_and_exit_code(server, tmp_path):
    env, log = server
    (tmp_path / "cfg.yaml").write_bytes(VALID.read_bytes())
    ok = subprocess.run([FEDHPC, "config", "check", "cfg.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("cfg.yaml: valid; run 'demo', 3 sites")  # a relative path: the job's cwd
    bad = subprocess.run(
        [FEDHPC, "config", "check", "missing.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (bad.returncode, bad.stdout, bad.stderr) == (2, "", "missing.yaml: no such config file\n")
    # stdin is the job's too: the config is read from it.
    piped = subprocess.run(
        [FEDHPC, "config", "check", "/dev/stdin"], input="run: x\n", env=env, capture_output=True, text=True
    )
    assert piped.returncode == 2 and "'sites' is a required property" in piped.stdout + piped.stderr
    assert served(log) == [
        "fedhpc config check cfg.yaml",
        "fedhpc config check missing.yaml",
        "fedhpc config check /dev/stdin",
    ]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_jobs_process_reaches_the_command(server, signum):
    env, log = server
    # Reading its config from a pipe that stays open, the command waits until it is stopped.
    job = subprocess.Popen([FEDHPC, "config", "check", "/dev/stdin"], stdin=subprocess.PIPE, env=env)
    child = child_of(log, "config check /dev/stdin")
    assert Path(f"/proc/{child}").exists()
    job.send_signal(signum)
    # SIGTERM is passed on and the job's process ends as the command did; SIGKILL cannot be
    # caught, so the warm process kills the command when the job's process vanishes.
    assert job.wait(10) == -signum
    deadline = time.time() + 10
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split()[2] != "Z":
        assert time.time() < deadline, f"the command (pid {child}) outlived its job"
        time.sleep(0.05)


def test_the_command_ignores_what_the_jobs_process_was_started_ignoring(server):
    """A head job ignores Slurm's time-limit warning, which reaches every process of its step; a
    job it runs inherits that, and so must the command served for it."""
    env, log = server
    job = subprocess.Popen(
        [FEDHPC, "config", "check", "/dev/stdin"],
        stdin=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN),
    )
    child = child_of(log, "config check /dev/stdin")
    for pid in (job.pid, child):  # the whole step is warned
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)
    assert job.poll() is None and Path(f"/proc/{child}").exists()
    job.stdin.write(b"run: x\n")
    job.stdin.close()
    assert job.wait(10) == 2  # it went on to read its config (which lacks sites)


LATE_DISPOSITIONS = """
import sys, time
from fedhpc.cli import main, warm

on_time = warm._dispositions

def late(ignored):  # the moment between the fork and the job's dispositions, made 1.5 s long
    time.sleep(1.5)
    on_time(ignored)

warm._dispositions = late
warm.serve(sys.argv[1], sys.argv[2], sys.argv[3], main.main)
"""


@pytest.mark.parametrize("case", ["SIGTERM passed on", "SIGUSR1 the job ignores"])
def test_a_signal_that_reaches_a_new_child_early_acts_as_it_would_on_the_jobs_process(tmp_path, case):
    """A signal may reach the child before it has the job's dispositions (the job's process passes
    SIGTERM on as soon as it has the child's pid; Slurm warns the whole step). It must still end
    the command (not be taken by the warm process's own handler), or be ignored as the job ignores
    it (not kill with the default action)."""
    name, token, log = f"fedhpc-warm-test-{os.getpid()}", "t0ken", tmp_path / "warm.log"
    server = subprocess.Popen([str(BIN / "python"), "-c", LATE_DISPOSITIONS, name, token, str(log)])
    try:
        ready(log.parent, log.name)
        env = {**os.environ, warm.ENV: f"{name}:{token}:"}
        env.pop("SLURM_JOB_ID", None)
        ignore = case == "SIGUSR1 the job ignores"
        job = subprocess.Popen(
            [FEDHPC, "config", "check", "/dev/stdin"],
            stdin=subprocess.PIPE,
            env=env,
            preexec_fn=(lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)) if ignore else None,
        )
        child = child_of(log, "config check /dev/stdin")
        if ignore:
            os.kill(child, signal.SIGUSR1)  # still within the late second: held, then ignored
            time.sleep(2)
            assert job.poll() is None and Path(f"/proc/{child}").exists(), "SIGUSR1 killed the command"
            job.stdin.write(b"run: x\n")
            job.stdin.close()
            assert job.wait(10) == 2  # it went on to read its config (which lacks sites)
        else:
            job.send_signal(signal.SIGTERM)  # passed on within the late second: held, then acted on
            assert job.wait(10) == -signal.SIGTERM, "the command did not end on SIGTERM"
    finally:
        server.terminate()
        server.wait(10)


def test_a_signal_to_the_runs_whole_group_leaves_the_commands_to_end_as_they_would(server):
    """Ctrl-C or SIGTERM to the run's process group reaches every command itself; the warm process
    must not end first and take its children with it."""
    env, log = server
    job = subprocess.Popen([FEDHPC, "config", "check", "/dev/stdin"], stdin=subprocess.PIPE, env=env)
    child_of(log, "config check /dev/stdin")
    warm_pid = int(log.read_text().split("pid ", 1)[1].split()[0])
    os.kill(warm_pid, signal.SIGINT)
    os.kill(warm_pid, signal.SIGTERM)
    time.sleep(0.5)
    assert job.poll() is None, "the command was killed with the warm process"
    job.stdin.write(b"run: x\n")
    job.stdin.close()
    assert job.wait(10) == 2  # it read its config to the end
    deadline = time.time() + 10
    while Path(f"/proc/{warm_pid}").exists() and Path(f"/proc/{warm_pid}/stat").read_text().split()[2] != "Z":
        assert time.time() < deadline, "the warm process stayed after its last command"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"SLURM_JOB_ID": "4242"}, None),  # a job submitted to Slurm: never connects
        ({"APPTAINER_CONTAINER": "/images/site.sif"}, None),  # inside a container: never connects
        ({"PYTHONHASHSEED": "3"}, "PYTHONHASHSEED differ from the warm process's, read at import"),
        ({"LD_PRELOAD": "libfoo.so"}, "LD_PRELOAD differ from the warm process's, read at import"),
    ],
)
def test_a_job_the_warm_process_cannot_serve_exactly_runs_itself(server, tmp_path, extra, why):
    env, log = server
    out = subprocess.run([FEDHPC, "config", "check", str(VALID)], env={**env, **extra}, capture_output=True, text=True)
    assert out.returncode == 0 and "valid" in out.stdout, out.stderr
    assert served(log) == []
    refusals = [line for line in log.read_text().splitlines() if " refused " in line]
    if why is None:
        assert refusals == []
    else:
        assert len(refusals) == 1 and refusals[0].endswith(why), refusals


def test_only_the_same_user_with_the_runs_token_is_served(server):
    env, log = server
    name, token, _ = env[warm.ENV].split(":")
    wrong = subprocess.run(
        [FEDHPC, "config", "check", str(VALID)],
        env={**env, warm.ENV: f"{name}:x{token}:"},
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 0 and served(log) == [] and "refused" in log.read_text()
    # Another user's connection is closed unanswered (its `fedhpc` would then run itself).
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setuid(65534)
            import socket

            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect("\0" + name)
            try:
                s.sendall(b'{"token": "%s"}\n' % token.encode())
                code = 0 if s.recv(100) == b"" else 1
            except (ConnectionResetError, BrokenPipeError):  # closed before or after the request
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert served(log) == []


def test_a_served_command_runs_its_exit_handlers_but_not_torchs_operator_teardown(tmp_path):
    # The child runs what a process runs at exit (its atexit functions and finalizers), except the
    # finalizers with which torch unregisters its operator libraries: a third of a small command.
    script = """
import atexit, os, sys, weakref
from fedhpc.cli import warm
warm._preload()
import torch.library

class Held:
    pass

held = Held()
def armed():
    return [f.atexit for f in weakref.finalize._registry if f.peek()[1] is torch.library._del_library]

def command(argv):
    atexit.register(lambda: print("atexit ran; teardown armed:", any(armed()), flush=True))
    weakref.finalize(held, print, "finalizer ran", flush=True)
    return 3

pid = os.fork()
if pid == 0:
    warm._child(warm._Job(None), {"argv": ["fedhpc"], "cwd": os.getcwd(), "env": dict(os.environ)}, [], command, os.getppid())
_, status = os.waitpid(pid, 0)
teardown = [f for f in weakref.finalize._registry if f.peek()[1] is torch.library._del_library]
print("exit", os.waitstatus_to_exitcode(status), "teardown", len(teardown), all(f.atexit for f in teardown))
warm._skip_library_teardown()
print("skipped", not any(f.atexit for f in teardown), all(f.atexit for f in weakref.finalize._registry if f not in teardown))
"""
    job = subprocess.run([str(BIN / "python"), "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    lines = job.stdout.splitlines()
    assert lines[:2] == ["atexit ran; teardown armed: False", "finalizer ran"]
    word, code, _, count, armed = lines[2].split()
    assert (word, code, armed) == ("exit", "3", "True") and int(count) > 10, "torch's teardown is armed in the server"
    assert lines[3] == "skipped True True", "only torch's teardown is left out"


def test_one_parser_serves_every_command_from_its_defaults():
    # The warm process builds the parser once for all its children; a parse must not see another's.
    from fedhpc.cli.main import parser

    assert parser() is parser()
    first = parser().parse_args(["run", "--cold", "--", "-n"])
    again = parser().parse_args(["run"])
    assert (first.cold, first.snakemake_args) == (True, ["--", "-n"])
    assert (again.cold, again.snakemake_args) == (False, [])


def test_a_federation_served_warm_ends_with_the_model_of_one_run_cold(tmp_path):
    models = {}
    for mode in ("warm", "cold"):
        d = tmp_path / mode
        d.mkdir()
        cfg = tiny_config(d, rounds=1)
        write_config(d, cfg)
        run_workflow(d, *(["--cold"] if mode == "cold" else []))
        models[mode] = summary(d, cfg)["global_model_sha256"]
        logs = list((d / ".snakemake" / "log").glob("warm-*.log"))
        if mode == "cold":
            assert logs == []
        else:
            commands = {line.split()[1] for (log,) in [logs] for line in served(log)}
            assert {"init", "train", "verify", "aggregate", "evaluate", "promote"} <= commands
    assert models["warm"] == models["cold"]
