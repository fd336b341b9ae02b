"""One stage contract (issue 20): every workflow stage is `run(ctx, ...)` with ctx = config, layout,
trust, and its `fedhpc <verb>` parses, calls that run and prints."""

from __future__ import annotations

import importlib
import inspect

import pytest

from fedhpc.cli.main import main
from fedhpc.stages.context import Ctx
from tests.workflow_util import tiny_config, write_config

STAGES = ["shard", "init", "plan", "train", "gather", "verify", "aggregate", "evaluate", "promote", "track"]
STAGES += ["report", "exchange"]


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_runs_from_a_ctx(name):
    run = importlib.import_module(f"fedhpc.stages.{name}").run
    first = next(iter(inspect.signature(run).parameters.values()))
    assert (first.name, first.annotation) == ("ctx", "Ctx"), f"fedhpc.stages.{name}.run{inspect.signature(run)}"


# verb arguments -> the stage whose run it calls, the arguments after ctx, and what that run returns
CALLS = [
    (["plan", "--round", "3"], "plan", (3,), {"sites": {"lumi": {"shards": ["s0"], "tokens": 9, "reason": "pinned"}}}),
    (["gather", "--round", "2"], "gather", (2,), {"arrived": ["lumi"], "missing": []}),
    (["verify", "--round", "1"], "verify", (1,), {"accepted": ["lumi"], "rejected": {}}),
    (["promote", "--round", "4"], "promote", (4,), {"source": "candidate", "reason": "better"}),
    (["init"], "init", (), {"sha256": "ab" * 32}),
    (["shard", "--site", "lumi"], "shard", ("lumi",), {"shards": [], "heldout": []}),
    (
        ["evaluate", "--round", "0", "--which", "global", "--site", "a100", "--threads", "2"],
        "evaluate",
        (0, "global", "a100", 2),
        {"domains": {}, "holder": "a100"},
    ),
]


@pytest.mark.parametrize(("argv", "stage", "args", "returned"), CALLS, ids=[c[0][0] for c in CALLS])
def test_a_verb_calls_its_stage_run_with_the_runs_ctx(tmp_path, monkeypatch, capsys, argv, stage, args, returned):
    config = write_config(tmp_path, tiny_config(tmp_path))
    calls = []
    module = importlib.import_module(f"fedhpc.stages.{stage}")
    monkeypatch.setattr(module, "run", lambda ctx, *a: calls.append((ctx, a)) or returned)
    assert main([argv[0], "--config", str(config), *argv[1:]]) == 0
    [(ctx, got)] = calls
    assert isinstance(ctx, Ctx) and got == args
    assert ctx.layout.root == tmp_path / "results" / "tiny" and ctx.cfg.run == "tiny"
    assert capsys.readouterr().out  # the verb prints what the stage returned
