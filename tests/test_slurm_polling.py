"""The cap on the Slurm plugin's status-check back-off: what it waits, and a plugin it no longer fits."""

from __future__ import annotations

import sys
import types

import pytest

from fedhpc.ops.slurm_polling import PluginChanged, cap_status_interval


class _Remote:
    """The executor interface's wait: a property the plugin sets after each check."""

    def __init__(self, interval):
        self.workflow = types.SimpleNamespace(
            remote_execution_settings=types.SimpleNamespace(seconds_between_status_checks=interval)
        )
        self._next = None

    @property
    def next_seconds_between_status_checks(self):
        return (
            self.workflow.remote_execution_settings.seconds_between_status_checks if self._next is None else self._next
        )

    @next_seconds_between_status_checks.setter
    def next_seconds_between_status_checks(self, value):
        self._next = value


def _plugin(monkeypatch, base=_Remote) -> str:
    name = "fedhpc_test_fake_slurm_plugin"
    module = types.ModuleType(name)
    module.Executor = type("Executor", (base,), {})
    monkeypatch.setitem(sys.modules, name, module)
    return name


def test_the_wait_grows_no_longer_than_the_profiles_interval_and_a_shorter_first_wait_stays(monkeypatch):
    name = _plugin(monkeypatch)
    assert cap_status_interval(name) and cap_status_interval(name)  # twice: still one cap
    ex = sys.modules[name].Executor(30)
    ex.next_seconds_between_status_checks = 20  # slurm-init-seconds-before-status-checks
    assert ex.next_seconds_between_status_checks == 20
    for backoff in (30, 40, 180):  # the plugin's +10 s a quiet check
        ex.next_seconds_between_status_checks = backoff
        assert ex.next_seconds_between_status_checks == 30
    assert _Remote(30).next_seconds_between_status_checks == 30  # other executors untouched
    plain = _Remote(30)
    plain.next_seconds_between_status_checks = 180
    assert plain.next_seconds_between_status_checks == 180


def test_a_plugin_without_the_wait_it_caps_is_named_and_a_missing_plugin_is_no_error(monkeypatch):
    name = _plugin(monkeypatch, base=object)
    with pytest.raises(PluginChanged, match=f"{name}.Executor"):
        cap_status_interval(name)
    assert cap_status_interval("no_such_snakemake_executor_plugin") is False


def test_the_plugins_back_off_stays_when_the_head_asks_for_it(monkeypatch):
    name = _plugin(monkeypatch)
    monkeypatch.setenv("FEDHPC_SLURM_BACKOFF", "plugin")
    assert cap_status_interval(name) is False
    ex = sys.modules[name].Executor(30)
    ex.next_seconds_between_status_checks = 180
    assert ex.next_seconds_between_status_checks == 180


def test_the_installed_slurm_plugin_is_capped():
    # Guards the pinned plugin: an upgrade that renames the wait fails here, not silently on LUMI.
    from snakemake_executor_plugin_slurm import Executor

    assert cap_status_interval() is True
    settings = types.SimpleNamespace(seconds_between_status_checks=30)
    backed_off = types.SimpleNamespace(
        workflow=types.SimpleNamespace(remote_execution_settings=settings), _next_seconds_between_status_checks=180
    )
    # The plugin's own getter reads what its back-off stored; the cap answers the profile's 30 s.
    assert Executor.next_seconds_between_status_checks.fget(backed_off) == 30
