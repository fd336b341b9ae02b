# Config validation, the run directory, and the input functions every stage uses.
import json
import os
import shutil
import sys
from pathlib import Path

from fedhpc.config_schema import ConfigError, as_dict, validate
from fedhpc.files import write_json
from fedhpc.layout import round_name

try:
    CFG = validate(
        config,
        " + ".join(map(str, workflow.configfiles)) or "config",
        f"{workflow.basedir}/schemas/config.schema.json",
    )
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

RUN = f"{CFG.output_dir}/{CFG.run}"
SITES = sorted(CFG.sites)
ROUNDS = list(range(CFG.rounds.count))
KEYS = CFG.trust.keys_dir or f"{RUN}/keys"
# Every job reads the validated config from this snapshot, so `--config` overrides on the
# command line reach the jobs too. Rewritten only when it changes.
CONFIG_JSON = f"{RUN}/config.json"
_snapshot = json.dumps(config, indent=2, sort_keys=True) + "\n"
if not Path(CONFIG_JSON).exists() or Path(CONFIG_JSON).read_text() != _snapshot:
    write_json(CONFIG_JSON, config)
# Jobs call the `fedhpc` command: make the one installed beside this Snakemake findable
# even when its virtual environment is not activated.
if shutil.which("fedhpc") is None:
    os.environ["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )


wildcard_constraints:
    r=r"\d{4}",
    site="|".join(SITES),


def rdir(r):
    return f"{RUN}/rounds/{round_name(int(r))}"


def key_files(wildcards=None):
    return [f"{KEYS}/{name}.pub" for name in ["coordinator", *SITES]]


def corpus_inputs(wildcards):
    return [f"{RUN}/data/corpus/corpus.json"] if CFG.data.synth is not None else []


def global_of(wildcards):
    return [
        f"{rdir(wildcards.r)}/global/model.safetensors",
        f"{rdir(wildcards.r)}/global/model.json",
    ]


def plan_inputs(wildcards):
    return [f"{RUN}/data/manifest.json", *global_of(wildcards)]


def promote_inputs(wildcards):
    r = int(wildcards.nxt) - 1
    return {
        "candidate": f"{rdir(r)}/candidate/eval.json",
        "baseline": f"{rdir(r)}/global/eval.json",
    }


def previous_round(wildcards):
    return int(wildcards.nxt) - 1


def previous_track(wildcards):
    r = int(wildcards.r)
    return [f"{rdir(r - 1)}/tracked.json"] if r > 0 else []


def track_inputs(wildcards):
    r = int(wildcards.r)
    return [f"{rdir(r + 1)}/global/model.json", *previous_track(wildcards)]


def report_inputs(wildcards=None):
    last = rdir(CFG.rounds.count)
    tracked = [f"{rdir(r)}/tracked.json" for r in ROUNDS] if CFG.tracking.mlflow else []
    return [f"{last}/global/model.json", f"{last}/global/eval.json", *tracked]


def all_targets():
    trains = [f"{rdir(r)}/sites/{s}/status.json" for r in ROUNDS for s in SITES]
    return [f"{RUN}/summary.json", f"{RUN}/report/index.html", *trains]
