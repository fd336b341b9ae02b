"""The head's Slurm status checks keep the profile's interval instead of the plugin's back-off.

Snakemake's Slurm executor plugin (2.x) adds 10 s to its wait after every status check in which no
job ended, up to 180 s, whatever `seconds-between-status-checks` says. A federation's round is a
chain of jobs (train, aggregate, scoring) each of which starts only when the head has seen the
one before end: with the back-off the head saw a finished job up to 3 minutes late on LUMI,
several times a round (and up to 20 s late on the test clusters, whose jobs take seconds:
benchmarks/slurm_status_lag.py). The
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


class _Capped(property):
    """The plugin's wait before its next status check, at most the profile's interval."""

    def __init__(self, plugins: property):
        def get(executor):
            return min(
                plugins.fget(executor), executor.workflow.remote_execution_settings.seconds_between_status_checks
            )

        super().__init__(get, plugins.fset)


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
    if not isinstance(prop, _Capped):
        executor.next_seconds_between_status_checks = _Capped(prop)
    return True
