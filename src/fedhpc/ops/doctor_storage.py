"""`fedhpc doctor`'s storage checks: the run directory (writable, free space, Lustre quota) and the exchange hub."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import uuid
from pathlib import Path

from fedhpc.core.layout import RunLayout
from fedhpc.ops.doctor_checks import Check, Setup, first_line, run_command


def run_dir(setup: Setup) -> Path:
    out = Path(setup.cfg.output_dir)
    return (out if out.is_absolute() else setup.workdir / out) / setup.cfg.run


def existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_problem(directory: Path) -> str:
    """Why a file cannot be created in `directory` (tried with a temporary file, removed at once)."""
    if not directory.is_dir():
        return f"{directory} is not a directory"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fedhpc-doctor-", dir=directory)
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror}"
    os.close(fd)
    os.unlink(tmp)
    return ""


def model_bytes(setup: Setup) -> tuple[int | None, str]:
    """(bytes of one fp32 copy of the model, how that was found); None when it cannot be told."""

    cfg = setup.cfg
    existing = RunLayout.of(run_dir(setup)).global_model(0)
    if existing.exists():
        return existing.stat().st_size, f"as {existing}"
    if cfg.task.name == "gpt":
        from fedhpc.data.tokenizer import BYTE_VOCAB, TokenizerError, load_pretrained
        from fedhpc.training.sites import param_count

        vocab, tok = cfg.data.tokenizer.vocab_size, cfg.data.tokenizer
        if tok.kind == "byte":
            vocab = BYTE_VOCAB
        elif tok.kind == "pretrained" and tok.path:
            try:
                vocab = load_pretrained(tok.path, tok.eos).vocab_size
            except TokenizerError:
                pass  # the config check is where a bad tokenizer is reported; estimate with vocab_size
        return 4 * param_count(cfg.model, vocab), "fp32, from model: in the config"
    model_dir = Path(str(cfg.task.options.get("path", "")))
    weights = (
        [p for pattern in ("*.safetensors", "*.bin") for p in model_dir.glob(pattern)] if model_dir.is_dir() else []
    )
    if weights:
        return sum(p.stat().st_size for p in weights), f"as the weights in {model_dir}"
    return None, f"task {cfg.task.name!r} gives no model size before its first round"


def federation_bytes(setup: Setup) -> tuple[int | None, str]:
    """An upper bound of what the run directory will hold: every round keeps each site's update,
    the candidate and the global model; each site keeps its optimizer moments (two copies)."""
    one, how = model_bytes(setup)
    if one is None:
        return None, how
    sites, rounds = len(setup.cfg.sites), setup.cfg.rounds.count
    copies = rounds * (sites + 2) + 2 * sites
    return (
        one * copies,
        f"model {size(one)} ({how}) x {copies} copies ({rounds} rounds x ({sites} sites + 2) + 2 x {sites})",
    )


def size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) that holds `path`, from /proc/mounts."""
    best = ("/", "")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    resolved = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        inside = resolved == mnt or resolved.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best[0]):
            best = (mnt, parts[2])
    return best


def lustre_quota(directory: Path, mount: str) -> tuple[int | None, str]:
    """(bytes left under the tightest Lustre quota that applies to new files in `directory`,
    which quota); None when no limit is set or lfs cannot tell."""
    ids = [("-g", str(directory.stat().st_gid)), ("-u", str(os.getuid()))]
    proj = run_command(["lfs", "project", "-d", str(directory)])
    if proj.returncode == 0 and proj.stdout.split() and proj.stdout.split()[0] not in ("0", "-"):
        ids.insert(0, ("-p", proj.stdout.split()[0]))
    best: tuple[int | None, str] = (None, "")
    for flag, ident in ids:
        out = run_command(["lfs", "quota", "-q", flag, ident, mount])
        left = _quota_left(out.stdout, mount)
        if left is not None and (best[0] is None or left < best[0]):
            best = (left, f"lfs quota {flag} {ident}")
    return best


def _quota_left(text: str, mount: str) -> int | None:
    # `lfs quota -q`: <filesystem> <kbytes> <quota> <limit> <grace> <files> ... (may wrap after the name)
    tokens = text.split()
    if mount not in tokens:
        return None
    i = tokens.index(mount)
    try:
        used, soft, hard = (int(t.rstrip("*")) for t in tokens[i + 1 : i + 4])
    except ValueError:
        return None
    limits = [x for x in (soft, hard) if x > 0]
    return (min(limits) - used) * 1024 if limits else None


def run_dir_checks(setup: Setup) -> list[Check]:
    path = run_dir(setup)
    base = existing_ancestor(path)
    where = f"output_dir in {setup.config_path}"
    if problem := write_problem(base):
        return [
            Check(
                "run directory",
                "fail",
                f"{path}: {problem}",
                f"set {where} to a directory you can write"
                + (" (on LUMI: /scratch/project_<number>)" if setup.on_slurm else ""),
            )
        ]
    checks = [
        Check(
            "run directory", "ok", f"{path}: writable" if base == path else f"{path}: not there yet, {base} is writable"
        )
    ]
    home = Path.home().resolve()
    resolved = path.resolve()
    if setup.on_slurm and (resolved.is_relative_to(home) or str(resolved).startswith("/project/")):
        checks.append(
            Check(
                "run directory place",
                "warn",
                f"{path} is under {'$HOME' if resolved.is_relative_to(home) else '/project'}, whose quota is small "
                "(LUMI: 20 GB home, 50 GB /project) and not meant for checkpoints",
                f"set {where} to a directory on /scratch (LUMI: /scratch/project_<number>)",
            )
        )
    need, how = federation_bytes(setup)
    if need is None:
        checks.append(
            Check("space", "warn", f"cannot estimate what the run writes: {how}", "check the free space by hand")
        )
        return checks
    free = shutil.disk_usage(base).free
    mount, fstype = mount_of(base)
    left, which = (free, f"free on {mount} ({fstype or '?'})")
    if fstype == "lustre" and shutil.which("lfs"):
        quota, quota_name = lustre_quota(base, mount)
        if quota is not None and quota < left:
            left, which = quota, f"left under {quota_name}"
    detail = f"the run writes at most {size(need)}: {how}; {size(left)} {which}"
    if left < need:
        checks.append(
            Check("space", "fail", detail, "free space, move output_dir to a larger filesystem, or plan fewer rounds")
        )
    else:
        checks.append(Check("space", "ok", detail))
    return checks


def hub_checks(setup: Setup) -> list[Check]:
    ex = setup.cfg.exchange
    label = f"hub ({ex.kind})"
    if ex.kind == "local":
        return [Check("hub", "skipped", "exchange.kind is local: every stage works in one run directory")]
    if not ex.hub:
        return [Check(label, "skipped", "exchange.hub is not set: this side is the hub")]
    if ex.kind == "shared":
        return [shared_hub(Path(ex.hub), label)]
    if ex.kind == "rsync":
        return [rsync_hub(ex, label)]
    return [s3_hub(ex, label)]


def shared_hub(hub: Path, label: str) -> Check:
    base = existing_ancestor(hub)
    if problem := write_problem(base):
        return Check(
            label, "fail", f"{hub}: {problem}", "mount the shared filesystem here, or set exchange.hub to where it is"
        )
    if base != hub:
        return Check(
            label,
            "warn",
            f"{hub} does not exist yet ({base} is writable)",
            "start the coordinator first, or check the path",
        )
    return Check(label, "ok", f"{hub}: writable")


def rsync_hub(ex, label: str) -> Check:
    from fedhpc.exchange.hub import Rsync

    if not shutil.which("rsync"):
        return Check(label, "fail", "rsync is not on PATH", "install rsync (or `module load` it)")
    host, _, path = ex.hub.partition(":")
    ssh = shlex.split(Rsync(ex.hub, ex.ssh_port, ex.ssh_key, ex.known_hosts, timeout=10).ssh_command())
    # The hub directory may not exist before the coordinator's first round: test its nearest ancestor.
    script = (
        f'p={shlex.quote(path or ".")}; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; '
        'if [ -d "$p" ] && [ -w "$p" ]; then echo "FEDHPC-OK $p"; else echo "FEDHPC-NOWRITE $p"; fi'
    )
    proc = run_command([*ssh, host, script], timeout=30)
    out = proc.stdout.strip()
    if "FEDHPC-OK" in out:
        return Check(label, "ok", f"{ex.hub}: reachable over ssh (BatchMode), {out.split(' ', 1)[1]} writable")
    if "FEDHPC-NOWRITE" in out:
        return Check(
            label,
            "fail",
            f"{ex.hub}: {out.split(' ', 1)[1]} is not writable for you there",
            "ask the coordinator for write access to the hub",
        )
    return Check(
        label,
        "fail",
        f"{ex.hub}: ssh -p {ex.ssh_port} {host} failed ({first_line(proc)})",
        "check exchange.hub, ssh_port, ssh_key and known_hosts; `ssh -o BatchMode=yes` must log in without a prompt",
    )


def s3_hub(ex, label: str) -> Check:
    from fedhpc.exchange.hub import S3, TransferError, s3_client

    hub = S3(ex.hub, ex.s3_endpoint)
    bucket, key = hub.location(f".fedhpc-doctor-{uuid.uuid4().hex}")
    try:
        client = s3_client(ex.s3_endpoint)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"")
            client.delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            return Check(
                label,
                "fail",
                f"{ex.hub} (endpoint {ex.s3_endpoint or 'AWS'}): {exc}",
                "check the bucket name, exchange.s3_endpoint and your credentials (AWS_ACCESS_KEY_ID/..., ~/.aws/credentials)",
            )
    except TransferError as exc:
        return Check(label, "fail", str(exc), "pip install 'fedhpc[s3]'")
    return Check(label, "ok", f"{ex.hub}: an object was written and removed")
