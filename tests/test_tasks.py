"""The task interface: selection by name or import path, strict options, and the data a task writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedhpc.config.schema import ConfigError
from fedhpc.core.layout import RunLayout
from fedhpc.data.shards import ShardIntegrityError, load_manifest
from fedhpc.data.taskdata import read_records, verified_file
from fedhpc.stages.shard import prepare_data
from fedhpc.tasks import load_task
from fedhpc.tasks.gpt import GPTTask
from fedhpc.tasks.validation import validate
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import TrustStore
from tests.workflow_util import REPO

EXAMPLE = str(REPO / "examples" / "regression" / "task.py") + ":RegressionTask"


def raw(task: dict | None = None, **extra) -> dict:
    cfg = {"sites": {"lumi": {}, "laptop": {}}, "data": {"synth": {"domains": [{"name": "web"}]}}, **extra}
    if task is not None:
        cfg["task"] = task
    return cfg


def regression(**options) -> dict:
    return {"name": EXAMPLE, "options": {"domains": [{"name": "north", "site": "lumi"}], **options}}


def problems_of(cfg: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    return [line[4:] for line in str(info.value).splitlines() if line.startswith("  - ")]


def test_default_task_is_the_builtin_gpt():
    assert isinstance(load_task(validate(raw())), GPTTask)


def test_checking_a_config_and_planning_a_round_import_no_torch():
    # Every coordinator step validates the config with the task's own checks, and `plan` asks
    # the task for each site's batch: importing torch there cost every job seconds (benchmarks/README.md).
    code = (
        "import sys\n"
        "from fedhpc.tasks.validation import validate\n"
        "from fedhpc.tasks import load_task\n"
        f"cfg = validate({raw()!r})\n"
        "task = load_task(cfg)\n"
        "plan = {n: task.plan_site(n, s, {'tokenizer': {'vocab_size': 256}}) for n, s in cfg.sites.items()}\n"
        "assert all(p['micro_batch'] >= 1 for p in plan.values()), plan\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]


def test_user_task_is_loaded_from_a_file_path_with_typed_options():
    task = load_task(validate(raw(regression(hidden=7))))
    assert type(task).__name__ == "RegressionTask" and task.options.hidden == 7
    assert task.options.domains[0].site == "lumi" and task.options.features == 8


def test_unknown_task_option_is_an_error_naming_the_key():
    assert problems_of(raw(regression(hiden=7))) == [
        "unknown key task.options.hiden; allowed keys here: batch_size, domains, examples_per_shard, features, "
        "heldout_examples, hidden, lr, noise, shards_per_domain"
    ]
    nested = regression()
    nested["options"]["domains"][0]["colour"] = "red"
    assert problems_of(raw(nested))[0].startswith("unknown key task.options.domains[0].colour;")
    assert problems_of(raw(regression(hidden="many")))[0].startswith("task.options.hidden: 'many' is not of type")


def test_task_problems_name_the_key_at_fault():
    bad = regression()
    bad["options"]["domains"][0]["site"] = "mars"
    assert problems_of(raw(bad)) == ["task.options.domains[0].site: 'mars' is not a site"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("nonexistent_pkg_xyz.mod:Task", "task.name: cannot import 'nonexistent_pkg_xyz.mod' (ModuleNotFoundError"),
        ("fedhpc.config.federation:NoSuchThing", "task.name: 'fedhpc.config.federation' has no 'NoSuchThing'"),
        (
            "fedhpc.config.federation:Config",
            "task.name: 'fedhpc.config.federation:Config' is not a subclass of fedhpc.tasks.Task",
        ),
        ("gpt2", "task.name: 'gpt2' is neither a built-in (embedding, gpt, hf_causal_lm) nor an import path"),
        ("missing/file.py:T", "task.name: no such file 'missing/file.py'"),
    ],
)
def test_a_task_that_cannot_be_loaded_is_named(name, message):
    assert problems_of(raw({"name": name}))[0].startswith(message)


def test_gradient_corrections_need_a_task_that_supports_them():
    assert problems_of(raw(regression(), strategy={"name": "scaffold"})) == [
        f"strategy.name: 'scaffold' corrects the sites' gradients, which task '{EXAMPLE}' does not support"
    ]


def test_user_task_data_is_hashed_into_the_signed_manifest(tmp_path):
    cfg = validate(raw(regression(examples_per_shard=20, heldout_examples=10), output_dir=str(tmp_path)))
    layout = RunLayout.of(tmp_path / "run")
    trust = TrustStore(layout.keys_dir)
    create_keypair(layout.keys_dir, "coordinator")
    prepare_data(cfg, layout, trust)
    manifest = load_manifest(layout, trust)
    assert [s["id"] for s in manifest["shards"]] == ["north-000", "north-001"]
    assert all(s["tokens"] == 20 and s["residency"] == "lumi" for s in manifest["shards"])
    assert not layout.tokenizer.exists() and manifest["tokenizer"] is None
    entry = manifest["shards"][0]
    rows = read_records(verified_file(layout, entry, "shard"))
    assert len(rows) == 20 and len(rows[0]["x"]) == 8
    # A byte changed in a shard file is caught before any task reads it.
    path = layout.root / entry["path"]
    path.write_text(path.read_text().replace("1", "2", 1))
    with pytest.raises(ShardIntegrityError, match="north-000"):
        verified_file(layout, entry, "shard north-000")
    assert json.loads(layout.manifest.read_text())["task"] == EXAMPLE


def test_a_task_missing_a_required_method_is_named_before_any_round(tmp_path):
    (tmp_path / "half.py").write_text(
        "from fedhpc.tasks import Task\nclass Half(Task):\n    def init_model(self, manifest):\n        return {}, {}\n"
    )
    assert problems_of(raw({"name": f"{tmp_path}/half.py:Half"}))[0] == (
        f"task.name: '{tmp_path}/half.py:Half' does not implement evaluate, train_round (docs/writing-a-task.md)"
    )
