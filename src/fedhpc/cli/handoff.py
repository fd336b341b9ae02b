"""The job's side of the warm process (`fedhpc.cli.warm`): hand a `fedhpc` command to it, or say to run it here.

Every job of a run on the head's host starts in this module, so it imports only what a bare
interpreter already has or needs for a socket: a served coordinator step is tens of milliseconds
of work, and the warm process's own module (selectors, pathlib, contextlib) took a third of that
again to import.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys

ENV = "FEDHPC_WARM"
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def identity() -> dict[str, str]:
    """What must match between a job's `fedhpc` and the warm process for one to stand in for the other."""
    import fedhpc

    return {"exe": os.path.realpath(sys.executable), "pkg": os.path.realpath(fedhpc.__file__)}


def send(sock: socket.socket, doc: dict) -> None:
    sock.sendall(json.dumps(doc).encode() + b"\n")


def catchable() -> list[signal.Signals]:
    return sorted(set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}, key=int)


def handoff(argv: list[str]) -> int | None:
    """Run `fedhpc argv` in the run's warm process and return its exit code, or None when this
    job should run the command itself (no warm process, or one that cannot serve it exactly)."""
    name, _, rest = os.environ.get(ENV, "").partition(":")
    token, _, slurm_job = rest.partition(":")
    if not token or sys.platform != "linux":
        return None
    # A job submitted to Slurm runs inside its own allocation; a container's process stays inside.
    if os.environ.get("SLURM_JOB_ID", "") != slurm_job:
        return None
    if any(k in os.environ for k in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER")):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
        request = {
            "token": token,
            "argv": argv,
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "ignored": [int(n) for n in catchable() if signal.getsignal(n) == signal.SIG_IGN],
            **identity(),
        }
        data = json.dumps(request).encode() + b"\n"
        sock.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
        sock.sendall(data[1:])
        replies = sock.makefile("rb")
        first = json.loads(replies.readline() or b"{}")
    except (OSError, ValueError):
        sock.close()
        return None
    if "pid" not in first:
        sock.close()
        return None
    # The terminal's Ctrl-C reaches the child itself (same process group); other signals are
    # sent to this process alone, so they are passed on.
    for signum in FORWARDED:
        if signal.getsignal(signum) != signal.SIG_IGN:  # one ignored here is ignored there too
            signal.signal(signum, lambda n, _frame: send(sock, {"signal": n}))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for line in replies:
            reply = json.loads(line)
            if "exit" in reply:
                return int(reply["exit"])
            if "signal" in reply:
                signum = int(reply["signal"])
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return 128 + signum
    except (OSError, ValueError):
        pass
    print(f"fedhpc: the warm process ended before `fedhpc {' '.join(argv)}` did", file=sys.stderr)
    return 1
