"""`fedhpc doctor`'s Slurm checks: the cluster answers, the profile's partitions admit its runtimes, the account."""

from __future__ import annotations

import getpass
import shutil
from typing import Any

from fedhpc.ops.doctor_checks import Check, Setup, first_line, run_command

# Accounts the shipped profiles carry until a user puts theirs in.
EXAMPLE_ACCOUNTS = {"project_465000000", "my_project"}


def minutes(value: Any) -> int | None:
    """A Snakemake `runtime` (minutes, or '2h'-style text) or submitit `time` in minutes."""
    from snakemake.exceptions import WorkflowError
    from snakemake.resources import Resource  # the same reading Snakemake gives it

    if value is None or value == "":
        return None
    try:
        if isinstance(value, str) and ("-" in value or ":" in value):
            return slurm_minutes(value)
        return int(Resource.parse_human_friendly("runtime", value))
    except (ValueError, TypeError, WorkflowError):
        return None  # Snakemake or submitit reports an unreadable time itself, naming the resource


def slurm_minutes(text: str) -> int | None:
    """Slurm's time format ([days-]hours:minutes:seconds, minutes:seconds, minutes) in minutes;
    None for no limit."""
    text = text.strip()
    if text.upper() in ("INFINITE", "UNLIMITED", "NONE", "N/A", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:
        h, m, s = (0, *parts) if not days else (parts[0], parts[1], 0)
    else:
        h, m, s = (parts[0], 0, 0) if days else (0, parts[0], 0)
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


def partition_needs(setup: Setup) -> dict[str, dict[str, Any]]:
    """partition -> {"minutes": the longest runtime asked of it, "who": [rules...]} from the
    profile's default-resources, set-resources and head.yaml."""
    default = setup.profile.get("default-resources") or {}
    needs: dict[str, dict[str, Any]] = {}

    def add(partition: str | None, runtime: Any, who: str) -> None:
        if not partition:
            return
        entry = needs.setdefault(partition, {"minutes": None, "who": []})
        entry["who"].append(who)
        m = minutes(runtime)
        if m is not None and (entry["minutes"] is None or m > entry["minutes"]):
            entry["minutes"] = m

    add(default.get("slurm_partition"), default.get("runtime"), "default-resources")
    for rule, res in (setup.profile.get("set-resources") or {}).items():
        res = res or {}
        add(
            res.get("slurm_partition", default.get("slurm_partition")), res.get("runtime", default.get("runtime")), rule
        )
    add(setup.head.get("partition"), setup.head.get("time"), "head.yaml")
    return needs


def accounts(setup: Setup) -> dict[str, list[str]]:
    """account -> where the profile names it."""
    found: dict[str, list[str]] = {}
    default = setup.profile.get("default-resources") or {}
    if default.get("slurm_account"):
        found.setdefault(str(default["slurm_account"]), []).append("default-resources")
    for rule, res in (setup.profile.get("set-resources") or {}).items():
        if (res or {}).get("slurm_account"):
            found.setdefault(str(res["slurm_account"]), []).append(rule)
    if setup.head.get("account"):
        found.setdefault(str(setup.head["account"]), []).append("head.yaml")
    return found


def slurm_checks(setup: Setup) -> list[Check]:
    if not setup.on_slurm:
        why = f"profile {setup.profile_dir.name} runs jobs on this machine (executor: {setup.profile.get('executor', 'local')})"
        return [Check("slurm", "skipped", why)]
    proc = run_command(["sinfo", "-h", "-o", "%R"])
    if proc.returncode != 0:
        return [
            Check(
                "slurm",
                "fail",
                f"sinfo: {first_line(proc)}",
                "run doctor on the cluster's login node (or export SLURM_CONF if slurm.conf is not in /etc/slurm)",
            )
        ]
    visible = sorted(set(proc.stdout.split()))
    checks = [Check("slurm", "ok", f"sinfo answers; partitions: {', '.join(visible)}")]
    info = partition_info()
    for name, need in sorted(partition_needs(setup).items()):
        checks.append(partition_check(setup, name, need, info.get(name), visible))
    return checks + account_checks(setup, info)


def partition_info() -> dict[str, dict[str, str]]:
    """`scontrol show partition`, one dict of its fields per partition."""
    proc = run_command(["scontrol", "--oneliner", "show", "partition"])
    parts = {}
    for line in proc.stdout.splitlines():
        fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if "PartitionName" in fields:
            parts[fields["PartitionName"]] = fields
    return parts


def partition_check(setup: Setup, name: str, need: dict, info: dict | None, visible: list[str]) -> Check:
    who = ", ".join(need["who"])
    label = f"partition {name}"
    rules = [w for w in need["who"] if w != "head.yaml"]
    where = " and ".join(
        ([f"slurm_partition in {setup.where('config.yaml')}"] if rules else [])
        + ([f"partition in {setup.where('head.yaml')}"] if len(rules) < len(need["who"]) else [])
    )
    if info is None and name not in visible:
        return Check(
            label,
            "fail",
            f"no partition {name!r} on this cluster (asked by {who})",
            f"set {where} to one of: {', '.join(visible)}",
        )
    info = info or {}
    limit = slurm_minutes(info.get("MaxTime", "UNLIMITED"))
    state = info.get("State", "UP")
    if need["minutes"] is not None and limit is not None and need["minutes"] > limit:
        return Check(
            label,
            "fail",
            f"time limit {info['MaxTime']} ({limit} min) is shorter than the {need['minutes']} min runtime asked by {who}",
            f"lower the runtime of {who} to at most {limit} min, or change {where} to a partition that allows it",
        )
    if state != "UP":
        return Check(label, "warn", f"state {state}", "jobs queue there but do not start until it is UP again")
    asked = f"{need['minutes']} min" if need["minutes"] is not None else "no runtime"
    return Check(label, "ok", f"exists, time limit {info.get('MaxTime', '?')}, {asked} asked by {who}")


def account_checks(setup: Setup, info: dict[str, dict[str, str]]) -> list[Check]:
    named = accounts(setup)
    if not named:
        why = "the profile submits without an account" + (
            " (slurm-no-account)" if setup.profile.get("slurm-no-account") else ""
        )
        return [Check("account", "skipped", why)]
    checks = []
    partitions = sorted(partition_needs(setup))
    for acct, where in sorted(named.items()):
        label = f"account {acct}"
        if acct in EXAMPLE_ACCOUNTS:
            checks.append(
                Check(
                    label,
                    "fail",
                    f"{acct} is the example account the shipped profile carries, not yours ({', '.join(where)})",
                    f"put your project account in {setup.where('config.yaml')} (slurm_account) and head.yaml",
                )
            )
            continue
        denied = [p for p in partitions if not partition_admits(info.get(p, {}), acct)]
        if denied:
            checks.append(
                Check(
                    label,
                    "fail",
                    f"partition(s) {', '.join(denied)} do not admit account {acct}",
                    "ask the centre for access or use another partition",
                )
            )
            continue
        checks.append(account_membership(acct, partitions))
    return checks


def partition_admits(info: dict[str, str], acct: str) -> bool:
    allow = info.get("AllowAccounts", "ALL")
    deny = info.get("DenyAccounts", "")
    return (allow == "ALL" or acct in allow.split(",")) and acct not in deny.split(",")


def account_membership(acct: str, partitions: list[str]) -> Check:
    label = f"account {acct}"
    if shutil.which("lumi-allocations"):
        return lumi_allocation(acct)
    config = run_command(["scontrol", "show", "config"])
    if "accounting_storage/none" in config.stdout:
        return Check(
            label,
            "skipped",
            "cannot be verified: this cluster keeps no accounting database (AccountingStorageType none); "
            "sbatch checks it at the first submission",
        )
    user = getpass.getuser()
    proc = run_command(
        ["sacctmgr", "-nP", "show", "associations", f"users={user}", f"accounts={acct}", "format=Account,Partition"]
    )
    if proc.returncode != 0:
        return Check(
            label, "warn", f"sacctmgr: {first_line(proc)}", "check it by hand: sacctmgr show associations user=$USER"
        )
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.strip()]
    if not rows:
        return Check(
            label,
            "fail",
            f"user {user} has no association with account {acct}",
            "use an account listed by `sacctmgr show associations user=$USER`, or ask your PI to add you",
        )
    allowed = {r[1] for r in rows if len(r) > 1}
    if "" not in allowed and (missing := [p for p in partitions if p not in allowed]):
        return Check(
            label,
            "fail",
            f"account {acct} may not use {', '.join(missing)}",
            "use the partitions it is associated with",
        )
    return Check(label, "ok", f"user {user} is associated with {acct}")


def lumi_allocation(acct: str) -> Check:
    """LUMI's own view of a project: membership and what is left of its allocation."""
    label = f"account {acct}"
    proc = run_command(["lumi-allocations", "-p", acct])
    line = next((ln for ln in proc.stdout.splitlines() if ln.split("|")[0].strip() == acct), None)
    if line is None:
        return Check(
            label,
            "fail",
            f"lumi-allocations knows no project {acct} of yours: {first_line(proc)}",
            "use a project you are a member of (`groups` lists them as project_<number>)",
        )
    spent = [f.strip() for f in line.split("|")[1:] if _spent(f)]
    if spent:
        return Check(
            label,
            "fail",
            f"allocation used up: {'; '.join(spent)}",
            "ask your resource allocator for more, or use another project",
        )
    return Check(label, "ok", " ".join(line.split()))


def _spent(field_text: str) -> bool:
    used, _, rest = field_text.strip().partition("/")
    alloc = rest.split(" ")[0]
    try:
        return float(alloc) > 0 and float(used) >= float(alloc)
    except ValueError:
        return False
