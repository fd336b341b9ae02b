"""The head's Slurm status checks keep the profile's interval instead of the plugin's back-off.

Snakemake's Slurm executor plugin (2.x) adds 10 s to its wait after every status check in which no
job ended, up to 180 s, whatever `seconds-between-status-checks` says. A federation's round is a
chain of jobs (train, aggregate, scoring) each of which starts only when the head has seen the
one before end: with the back-off the head saw a finished job up to 3 minutes late on LUMI,
several times a round (and 15-20 s late on the test clusters, whose jobs take seconds). The
profiles' intervals (30 s on LUMI, `sacct` once per interval for all jobs) are what a
cluster's slurmctld is asked to bear; the head now keeps to them. `FEDHPC_SLURM_BACKOFF=plugin`
in the head's environment keeps the plugin's back-off (for a centre that wants fewer queries
from idle heads, and for benchmarks/slurm_status_lag.py's baseline).
"""

from __future__ import annotations

import importlib
import os

BACKOFF_ENV = "FEDHPC_SLURM_BACKOFF"


class PluginChanged(RuntimeError):
    """The Slurm executor plugin no longer has the attribute the cap replaces."""


def _capped(prop: property) -> property:
    def get(self):
        wanted = prop.fget(self)
        ceiling = self.workflow.remote_execution_settings.seconds_between_status_checks
        return wanted if wanted is None or ceiling is None else min(wanted, ceiling)

    return property(
        get, prop.fset, doc="The plugin's wait before its next status check, at most the profile's interval."
    )


def cap_status_interval(module: str = "snakemake_executor_plugin_slurm") -> bool:
    """Cap the Slurm executor's wait between status checks at `seconds-between-status-checks`
    (its first wait, `slurm-init-seconds-before-status-checks`, stays when shorter). Returns
    whether the wait is capped: not when the plugin is not installed or BACKOFF_ENV says
    "plugin". Raises PluginChanged if the plugin no longer waits the way this caps."""
    if os.environ.get(BACKOFF_ENV) == "plugin":
        return False
    try:
        executor = importlib.import_module(module).Executor
    except ImportError:
        return False
    prop = getattr(executor, "next_seconds_between_status_checks", None)
    if not isinstance(prop, property) or prop.fset is None:
        raise PluginChanged(
            f"{module}.Executor has no settable next_seconds_between_status_checks: the cap on its "
            "status-check back-off (fedhpc.ops.slurm_polling) needs updating for this plugin version"
        )
    if not getattr(prop.fget, "_fedhpc_capped", False):
        capped = _capped(prop)
        capped.fget._fedhpc_capped = True  # type: ignore[attr-defined]
        executor.next_seconds_between_status_checks = capped
    return True
