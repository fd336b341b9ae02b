"""`fedhpc doctor`'s image checks: the container runtime, each site's image and its torch build, bind paths."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from fedhpc.ops.doctor_checks import Check, Setup, first_line, run_command
from fedhpc.ops.submit import SubmitError, head_parameters

# Run inside the image (or on the host) with nothing but the standard library and torch. RCCL's
# network plugin (aws-ofi-rccl: librccl-net*.so, or libnccl-net*.so in newer builds) sits in
# /opt/aws-ofi-rccl in older LUMI PyTorch containers and in the system library directory of the AI
# Factory images (where containers/rocm.def's %test finds it with ldconfig); without it RCCL
# between nodes falls back to TCP sockets over Slingshot.
PROBE = r"""
import glob, importlib.util, json, os, shutil, sys
out = {"python": sys.version.split()[0], "fedhpc": shutil.which("fedhpc")}
try:
    import torch
    out.update(torch=torch.__version__, hip=getattr(torch.version, "hip", None), cuda=torch.version.cuda)
    try:
        from torch.distributed.fsdp import fully_shard
        out["fully_shard"] = True
    except ImportError:
        out["fully_shard"] = False
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
out["deepspeed"] = importlib.util.find_spec("deepspeed") is not None
dirs = ["/opt/aws-ofi-rccl", "/opt/aws-ofi-rccl/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/lib",
        *os.environ.get("LD_LIBRARY_PATH", "").split(":")]
out["rccl_net"] = sorted({p for d in dirs if d for n in ("librccl-net*.so*", "libnccl-net*.so*")
                          for p in glob.glob(os.path.join(d, n))})
print("FEDHPC-DOCTOR " + json.dumps(out))
"""
PROBE_TIMEOUT = 300  # importing torch from a fresh image on Lustre takes a while the first time
DEFINITION = {"rocm": "containers/rocm.def", "cuda": "containers/cuda.def", "cpu": "containers/cpu.def"}


def probe(argv_prefix: list[str]) -> tuple[dict | None, str]:
    """What PROBE finds when run by `argv_prefix + [python, -c, PROBE]`; (None, why) when it did not run."""
    proc = run_command([*argv_prefix, "-c", PROBE], timeout=PROBE_TIMEOUT, env=existing_binds(os.environ))
    for line in proc.stdout.splitlines():
        if line.startswith("FEDHPC-DOCTOR "):
            return json.loads(line.removeprefix("FEDHPC-DOCTOR ")), ""
    return None, first_line(proc)


def image_checks(setup: Setup) -> list[Check]:
    from fedhpc.ops.containers import find_runtime

    cfg, runtime = setup.cfg, None
    sites = setup.trained_sites()
    images = {name: cfg.sites[name].container for name in sites if cfg.sites[name].container}
    coordinator_image = cfg.container if setup.site is None and cfg.exchange.role != "site" else None
    if not images and not coordinator_image:
        checks = [
            Check("container runtime", "skipped", "no site this side trains uses a container (sites.<name>.container)")
        ]
    else:
        runtime = find_runtime()
        if runtime is None:
            return [
                Check(
                    "container runtime",
                    "fail",
                    "neither apptainer nor singularity is on PATH",
                    "run doctor where jobs run (on LUMI: a login node has singularity), or `module load` the runtime",
                )
            ]
        version = run_command([runtime, "--version"])
        checks = [Check("container runtime", "ok", f"{runtime}: {first_line(version)}")]
        checks += bind_checks(setup, runtime)
    probes: dict[str, tuple[dict | None, str]] = {}

    def probed(image: str | None) -> tuple[dict | None, str]:
        if image not in probes:
            prefix = [runtime, "exec", image, "python"] if image else [sys.executable]
            probes[image] = probe(prefix)
        return probes[image]

    if coordinator_image:
        checks.append(coordinator_check(local_image(setup, coordinator_image), probed))
    for name in sites:
        site = cfg.sites[name]
        label = f"site {name}"
        if site.container and is_uri(site.container):
            checks.append(
                Check(label, "skipped", f"{site.container} is pulled when a job starts; doctor pulls nothing")
            )
            continue
        if not site.container:
            if not setup.on_slurm:
                checks.append(Check(label, "skipped", "simulated on this machine: trains on the host's torch"))
                continue
            found, why = probed(None)
            # Jobs on the host find `fedhpc` beside this Python (rules/common.smk puts it on PATH).
            checks.append(site_check(setup, name, "the host environment", found, why, on_host=True))
            continue
        image = local_image(setup, site.container)
        if missing := image_missing(image):
            checks.append(
                Check(
                    label,
                    "fail",
                    f"sites.{name}.container: {missing}",
                    f"build it (`fedhpc container build {site.accelerator} --out DIR`) or point sites.{name}.container "
                    f"in {setup.config_path} at an existing image",
                )
            )
            continue
        found, why = probed(image)
        checks.append(site_check(setup, name, image, found, why))
    return checks


def is_uri(image: str) -> bool:
    return re.match(r"^[a-z]+://", image) is not None


def local_image(setup: Setup, image: str) -> str:
    """The image path as jobs see it: relative paths start in the working directory."""
    return image if is_uri(image) or Path(image).is_absolute() else str(setup.workdir / image)


def image_missing(image: str) -> str:
    """Why a local image file cannot be used; empty when it can."""
    path = Path(image)
    if not path.exists():
        return f"{image} does not exist"
    if not os.access(path, os.R_OK):
        return f"{image} is not readable by you"
    return ""


def coordinator_check(image: str, probed) -> Check:
    label = "image (coordinator rules)"
    if is_uri(image):
        return Check(label, "skipped", f"{image} is pulled when a job starts; doctor pulls nothing")
    if missing := image_missing(image):
        return Check(
            label,
            "fail",
            f"container: {missing}",
            "build the image or set the top-level `container:` to an existing one",
        )
    found, why = probed(image)
    if found is None:
        return Check(
            label,
            "fail",
            f"{image}: python -c did not run ({why})",
            "check the image with `<runtime> exec IMAGE python`",
        )
    if not found.get("fedhpc"):
        return Check(
            label, "fail", f"{image} has no `fedhpc` command", "build it from containers/*.def, which install fedhpc"
        )
    return Check(label, "ok", f"{image}: fedhpc and torch {found.get('torch')}")


def site_check(setup: Setup, name: str, where: str, found: dict | None, why: str, on_host: bool = False) -> Check:
    """Whether what `where` holds can train site `name` as configured."""
    site = setup.cfg.sites[name]
    label = f"site {name}"
    image = f"an image built from {DEFINITION[site.accelerator]} (`fedhpc container build {site.accelerator}`)"
    rebuild = f"set sites.{name}.container to {image}" if on_host else f"use {image}"
    if found is None:
        return Check(
            label, "fail", f"{where}: python -c did not run ({why})", f"{rebuild}; the image needs python on its PATH"
        )
    if "torch_error" in found:
        return Check(label, "fail", f"{where}: import torch failed ({found['torch_error']})", rebuild)
    torch = f"torch {found['torch']}"
    problems, fixes = [], []
    if site.accelerator == "rocm" and not found.get("hip"):
        problems.append(f"{torch} is not a ROCm build (torch.version.hip is None), but the site is `rocm`")
        fixes.append(rebuild + ", or use one of LUMI's PyTorch images (/appl/local/laifs/containers)")
    if site.accelerator == "cuda" and not found.get("cuda"):
        problems.append(f"{torch} is not a CUDA build (torch.version.cuda is None), but the site is `cuda`")
        fixes.append(rebuild)
    if site.engine == "fsdp" and not found.get("fully_shard"):
        problems.append(
            f"{torch} has no torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6), needed by engine fsdp"
        )
        fixes.append(f"use an image with torch >= 2.6, or set sites.{name}.engine to ddp")
    if site.engine == "deepspeed" and not found.get("deepspeed"):
        problems.append("deepspeed is not installed, needed by engine deepspeed")
        fixes.append("install deepspeed in the image (containers/*.def do), or choose another engine")
    if not on_host and not found.get("fedhpc"):
        problems.append("no `fedhpc` command, which training jobs run")
        fixes.append("install fedhpc in the image (containers/*.def copy the repository and pip install it)")
    if problems:
        return Check(label, "fail", f"{where}: " + "; ".join(problems), "; ".join(dict.fromkeys(fixes)))
    build = f"ROCm {found['hip']}" if found.get("hip") else f"CUDA {found['cuda']}" if found.get("cuda") else "CPU"
    detail = f"{where}: {torch} ({build}), engine {site.engine}"
    if site.accelerator == "rocm" and not found.get("rccl_net"):
        # One node talks over xGMI; between nodes RCCL without the plugin falls back to TCP sockets.
        status = "fail" if site.nodes > 1 else "warn"
        return Check(
            label,
            status,
            detail + "; no aws-ofi-rccl plugin (librccl-net*.so): RCCL between nodes would use TCP sockets",
            "base the image on LUMI's PyTorch containers, which carry it in /opt/aws-ofi-rccl, or add its "
            "directory to LD_LIBRARY_PATH (SINGULARITYENV_LD_LIBRARY_PATH)",
        )
    if found.get("rccl_net"):
        detail += f", RCCL plugin {found['rccl_net'][0]}"
    return Check(label, "ok", detail)


def bind_paths(setup: Setup, runtime: str) -> tuple[str, list[str]]:
    """(where they come from, host paths) of the bind list the jobs will get: the variable the
    runtime reads (SingularityCE only SINGULARITY_BIND, Apptainer APPTAINER_BIND first), else
    the one the profile's site environment (head.yaml `site_env`) exports, which the head job
    sources for every job."""
    names = ("SINGULARITY_BIND",) if runtime == "singularity" else ("APPTAINER_BIND", "SINGULARITY_BIND")
    for var in names:
        if os.environ.get(var):
            return f"${var}", _sources(os.environ[var])
    env_file = site_env_file(setup.profile_dir)
    exports = env_file.read_text().splitlines() if env_file else []
    for var in names:
        for line in exports:
            if m := re.match(rf"^\s*export\s+{var}=[\"']?([^\"'$]+)", line):
                return str(env_file), _sources(m.group(1))
    return "", []


def site_env_file(profile_dir: Path) -> Path | None:
    """The environment script the profile's head job sources (head.yaml `site_env`), if any."""
    try:
        env = head_parameters(profile_dir).get("site_env")
    except SubmitError:
        return None  # no head.yaml (a local profile) or a bad one: the profile check says so
    return Path(env) if env else None


def existing_binds(env: dict[str, str]) -> dict[str, str]:
    """`env` with the bind variables cut to sources that exist here: lumi.sh binds slurmd's spool,
    which exists on compute nodes only, and a missing bind source stops the runtime before the
    probe runs (bind_checks reports the missing ones separately)."""
    out = dict(env)
    for var in ("APPTAINER_BIND", "SINGULARITY_BIND"):
        if env.get(var):
            out[var] = ",".join(e for e in env[var].split(",") if e.strip() and Path(e.split(":")[0]).exists())
    return out


def _sources(spec: str) -> list[str]:
    # Each entry is src[:dest[:options]]; only the host side has to exist.
    return [entry.split(":")[0] for entry in spec.split(",") if entry.strip()]


def bind_checks(setup: Setup, runtime: str) -> list[Check]:
    origin, paths = bind_paths(setup, runtime)
    if not paths:
        return [Check("bind paths", "skipped", "no SINGULARITY_BIND or APPTAINER_BIND set")]
    missing = [p for p in paths if not Path(p).exists()]
    # slurmd's spool is node-local: it exists on compute nodes, where the containers run, not here.
    node_local = [p for p in missing if p.startswith("/var/spool/")]
    if missing != node_local:
        return [
            Check(
                "bind paths",
                "fail",
                f"{origin} binds paths that do not exist: {', '.join(p for p in missing if p not in node_local)}",
                f"remove them from {origin} or create them; a bind source that is missing stops the container",
            )
        ]
    if node_local:
        return [
            Check(
                "bind paths",
                "warn",
                f"{origin} binds {', '.join(node_local)}, which does not exist on this node",
                "nothing, if it exists on the compute nodes (slurmd's spool does); otherwise remove it",
            )
        ]
    return [Check("bind paths", "ok", f"{origin}: {', '.join(paths)} exist")]
