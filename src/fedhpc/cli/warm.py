"""The warm process: runs the jobs' `fedhpc` commands on the head's host with torch already imported.

A fresh `fedhpc` process spends about 1.7 s of CPU importing torch before it does anything; a
round of the local profile starts a dozen such jobs, and on a login node's shared file system
the import takes far longer. `fedhpc run` starts one warm process beside Snakemake. A job's
`fedhpc` (see `handoff`) connects to it, passes its arguments, working directory, environment
and its stdin/stdout/stderr descriptors, and the warm process forks a child that runs the
command exactly as the job's own process would, writing to the job's log. The job's process
waits, forwards the signals it gets, and exits as the child did (the same code, or killed by
the same signal), so Snakemake, the job's shell and its `||` failure branch see no difference.

A job runs cold, in its own process, whenever the warm process cannot serve it exactly: inside a
Slurm job or a container, from another Python or package, with an environment that the already
loaded libraries read at import (PYTHON*, LD_*, OpenMP/BLAS, TORCH*), or before the warm process
has finished importing. Only the same user may connect (SO_PEERCRED), with the run's token.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

from fedhpc.cli.handoff import ENV, FORWARDED, catchable, identity, send

# Signals held back from a new child until it has the job's dispositions (see _Server.fork).
HELD = {*FORWARDED, signal.SIGINT}
# Read by already imported libraries at their import or load: a job whose value differs runs cold.
IMPORT_TIME_ENV = ("PYTHON", "LD_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "TORCH", "PYTORCH")
# ... except the thread counts Snakemake sets per job, which the child applies (see _fresh_state).
APPLIED_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "GOTO_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def _import_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV) and k not in APPLIED_ENV}


# --- the warm process ----------------------------------------------------------------------


class _Job:
    """One connected job: its socket, what it has sent so far, and the child running it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []
        self.pid = 0


def _preload(warmups=()) -> None:
    """Import what the commands import, and build once what each would build (`warmups`), without
    running anything that starts threads."""
    import numpy.random  # noqa: F401  (imported on first use: 10 ms of every child's fresh seed)
    import torch  # noqa: F401

    import fedhpc.stages.aggregate  # noqa: F401
    import fedhpc.stages.evaluate  # noqa: F401
    import fedhpc.stages.init  # noqa: F401
    import fedhpc.stages.train  # noqa: F401
    import fedhpc.stages.verify  # noqa: F401

    for build in warmups:
        build()


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, children first (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _kill_tree(pid: int) -> None:
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _refusal(request: dict, token: str, identity: dict[str, str], fds: list[int]) -> str | None:
    if request.get("token") != token:
        return "wrong token"
    if len(fds) != 3:
        return "no stdin/stdout/stderr"
    if any(request.get(k) != v for k, v in identity.items()):
        return "another Python or fedhpc"
    env, here = request.get("env", {}), dict(os.environ)
    if differ := {k for k, _ in set(_import_env(env).items()) ^ set(_import_env(here).items())}:
        return f"{', '.join(sorted(differ))} differ from the warm process's, read at import"
    if unset := [k for k in APPLIED_ENV if k in here and k not in env]:
        return f"{', '.join(unset)} unset, read at import"
    return None


def _child(
    job: _Job, request: dict, others: list[socket.socket], main, warm_pid: int, mask: set[int] | None = None
) -> None:
    """In the forked child: become the job's process and run its command; never returns. `mask`:
    the signal mask to restore once the job's dispositions are in place (signals held until then)."""
    code = 1
    try:
        import ctypes

        # The child dies with the warm process, as a job's process dies with its run.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != warm_pid:  # it died before the line above
            os._exit(1)
        for s in others:
            s.close()
        for target, fd in enumerate(job.fds):
            os.dup2(fd, target)
            os.close(fd)
        _dispositions(set(request.get("ignored", [])))
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        _fresh_stdio()
        _fresh_state()
        code = main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            _skip_library_teardown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            if code is not None and code < 0:  # as the interpreter does after an uncaught Ctrl-C
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            os._exit(code or 0)


def _skip_library_teardown() -> None:
    """Leave out, of the exit handlers a job's process runs, torch's unregistering of its operator
    libraries: over a hundred finalizers that tidy the dispatcher of a process about to end, which
    were a third of a small served command's time (about 27 ms). A cold process runs them."""
    import weakref

    teardown = getattr(sys.modules.get("torch.library"), "_del_library", None)
    if teardown is None:
        return
    for fin in list(getattr(weakref.finalize, "_registry", {})):  # private: absent, nothing is skipped
        if (alive := fin.peek()) is not None and alive[1] is teardown:
            fin.atexit = False


def _dispositions(ignored: set[int]) -> None:
    """The signal dispositions a fresh interpreter exec'd by the job's process would start with:
    what that process ignored stays ignored (a head job ignores Slurm's time-limit warning, for
    one), the rest default, and Python's own: Ctrl-C raises, SIGPIPE and SIGXFSZ are ignored."""
    signal.set_wakeup_fd(-1)
    for signum in catchable():
        if signum in (signal.SIGPIPE, signal.SIGXFSZ):
            continue
        with contextlib.suppress(OSError, ValueError):  # some real-time signals are glibc's own
            if signum == signal.SIGINT and signum not in ignored:
                signal.signal(signum, signal.default_int_handler)
            else:
                signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)


def _fresh_stdio() -> None:
    """Text streams on the job's descriptors, buffered as a fresh interpreter buffers them there."""
    import io

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        raw = io.FileIO(fd, "rb" if fd == 0 else "wb", closefd=False)
        buffered = io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(
            buffered,
            encoding=old.encoding,
            errors=old.errors,
            line_buffering=fd == 2 or (fd == 1 and os.isatty(1)),
            write_through=fd == 2 or (fd == 1 and unbuffered),
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _fresh_state() -> None:
    """What a fresh process would have drawn or read anew: numpy's global seed, the temporary
    directory, the thread counts of torch and of numpy's OpenBLAS."""
    import tempfile

    import numpy
    import torch

    numpy.random.seed()
    tempfile.tempdir = None
    if (n := _count("OMP_NUM_THREADS") or _count("MKL_NUM_THREADS")) is not None:
        torch.set_num_threads(n)
    if (n := _count("OPENBLAS_NUM_THREADS") or _count("GOTO_NUM_THREADS")) is not None:
        _openblas_threads(n)


def _count(key: str) -> int | None:
    value = os.environ.get(key, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _openblas_threads(n: int) -> None:
    """Set the thread count of the OpenBLAS numpy loaded, which read the variables at its load."""
    import ctypes

    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
    for path in libs:
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, symbol):
                getattr(lib, symbol)(ctypes.c_int(n))
                break


# What a job or a child may have done meanwhile: gone (socket closed), exited, or sent garbage.
_GONE = (OSError, ValueError, KeyError)


class _Server:
    """The warm process's loop: accept jobs, fork their children, pass signals on, report exits."""

    def __init__(self, name: str, token: str, log_path: str | None, main, warmups=()):
        self.token, self.main, self.parent = token, main, os.getppid()
        self.log = open(log_path, "a", buffering=1) if log_path else sys.stderr  # noqa: SIM115
        t0 = time.monotonic()
        # Ctrl-C and SIGTERM to the run's whole process group reach the commands themselves: the
        # warm process leaves once they have ended, instead of killing them (PR_SET_PDEATHSIG) first.
        self.leaving: list[int] = []
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda signum, _frame: self.leaving.append(signum))
        _preload(warmups)
        self.identity = identity()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind("\0" + name)
        self.listener.listen(64)
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(wake_w)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.conns: dict[socket.socket, _Job] = {}  # every connected job; pid 0 until forked
        self.running: dict[int, _Job] = {}  # by the child's pid, until reaped
        self.note(f"ready in {time.monotonic() - t0:.1f} s, pid {os.getpid()}")

    def note(self, msg: str) -> None:
        self.log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}\n")

    def close(self, job: _Job) -> None:
        if self.conns.pop(job.sock, None) is not None:
            self.sel.unregister(job.sock)
            job.sock.close()

    def loop(self) -> None:
        """Until the process that started this one is gone (or SIGTERM) and no job is left."""
        while True:
            if (os.getppid() != self.parent or self.leaving) and self.listener.fileno() >= 0:
                self.sel.unregister(self.listener)
                self.listener.close()
            if self.listener.fileno() < 0 and not self.conns and not self.running:
                self.note("the run ended; leaving")
                return
            for key, _ in self.sel.select(timeout=1.0):
                if key.fileobj is self.listener:
                    conn, _addr = self.listener.accept()
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    if int.from_bytes(creds[4:8], sys.byteorder) != os.getuid():
                        conn.close()
                        continue
                    self.conns[conn] = _Job(conn)
                    self.sel.register(conn, selectors.EVENT_READ)
                elif key.fileobj == self.wake_r:
                    os.read(self.wake_r, 4096)
                elif (job := self.conns[key.fileobj]).pid == 0:
                    self.receive(job)
                else:
                    self.message(job)
            self.reap()

    def receive(self, job: _Job) -> None:
        """More of a job's request; once it is whole, its child starts or the job is refused."""
        data, fds, _flags, _addr = socket.recv_fds(job.sock, 1 << 16, 3)
        job.fds += fds
        job.buf += data
        if data and b"\n" not in job.buf:
            return
        try:
            request = json.loads(job.buf.split(b"\n", 1)[0])
            why = _refusal(request, self.token, self.identity, job.fds)
        except ValueError:
            request, why = {}, "an unreadable request"
        if why:
            self.note(f"refused `fedhpc {' '.join(request.get('argv', [])[1:])}`: {why}")
            with contextlib.suppress(*_GONE):
                send(job.sock, {"refuse": why})
        else:
            self.fork(job, request)
        for fd in job.fds:
            os.close(fd)
        if why:
            self.close(job)

    def fork(self, job: _Job, request: dict) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        warm_pid = os.getpid()
        # The job's process passes a signal on as soon as it has the child's pid, and the whole step
        # gets Slurm's warnings; until the child has the job's dispositions it has this process's
        # (SIGTERM only noted, SIGUSR1 fatal, SIGINT ignored). Held back, they reach it after.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
        pid = os.fork()
        if pid == 0:
            os.close(self.wake_r)
            os.close(signal.set_wakeup_fd(-1))  # the write end: only the parent's signals wake it
            _child(job, request, [self.listener, *self.conns], self.main, warm_pid, mask)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        job.pid = pid
        self.running[pid] = job
        self.note(f"pid {pid}: fedhpc {' '.join(request['argv'][1:])}")
        with contextlib.suppress(*_GONE):
            send(job.sock, {"pid": pid})

    def message(self, job: _Job) -> None:
        """A signal the job's process passes on, or its end: then the command is killed too."""
        data = job.sock.recv(4096)
        if not data:
            self.note(f"pid {job.pid}: the job's process vanished; killing the command")
            _kill_tree(job.pid)
            self.close(job)
        for line in data.splitlines():
            with contextlib.suppress(*_GONE):
                os.kill(job.pid, int(json.loads(line)["signal"]))

    def reap(self) -> None:
        """Tell each job whose child ended how it ended."""
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.running.pop(pid)
            if job.sock in self.conns:
                with contextlib.suppress(*_GONE):
                    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                    send(job.sock, {"signal": sig} if sig else {"exit": os.waitstatus_to_exitcode(status)})
                self.close(job)


def serve(name: str, token: str, log_path: str | None, main, warmups=()) -> None:
    """Import and build (`warmups`), then fork a child per job until the process that started this one is gone."""
    _Server(name, token, log_path, main, warmups).loop()


# --- started by `fedhpc run` ---------------------------------------------------------------


@contextlib.contextmanager
def started(log_dir: Path, enabled: bool = True):
    """A warm process for one `fedhpc run`, stopped when it ends; yields the environment the run's
    jobs need to find it (empty when there is none)."""
    import secrets
    import subprocess

    if not enabled or sys.platform != "linux":
        yield {}
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    name, token = f"fedhpc-warm-{secrets.token_hex(8)}", secrets.token_hex(16)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedhpc.cli.entry", name, str(log_dir / f"warm-{time.strftime('%Y%m%dT%H%M%S')}.log")],
        env={**os.environ, "FEDHPC_WARM_TOKEN": token, ENV: ""},
        stdin=subprocess.DEVNULL,
    )
    try:
        # A head that is itself a Slurm job serves its own jobs only, not the jobs it submits.
        yield {ENV: f"{name}:{token}:{os.environ.get('SLURM_JOB_ID', '')}"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
