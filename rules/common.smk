# Config validation, the run directory, and the input functions every stage uses; the head of
# a real run also writes the config snapshot (fedhpc.ops.run.prepare_head).
import json
import os
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import ExecMode

from fedhpc.config.schema import ConfigError
from fedhpc.core.layout import round_name
from fedhpc.ops.launch_prefix import aggregate_prefix, resident_cores, train_prefix
from fedhpc.ops.run import prepare_head
from fedhpc.ops.slurm_polling import cap_status_interval
from fedhpc.stages.failures import export_attempts, exported_attempts, new_invocation
from fedhpc.tasks import load_task
from fedhpc.tasks.validation import validate
from fedhpc.training.sites import site_ranks

try:
    CFG = validate(
        config,
        " + ".join(map(str, workflow.configfiles)) or "config",
        f"{workflow.basedir}/schemas/config.schema.json",
    )
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

RUN = f"{CFG.output_dir}/{CFG.run}"
ROLE = CFG.exchange.role
# A site's Snakemake trains for that site alone.
SITES = [CFG.exchange.site] if ROLE == "site" else sorted(CFG.sites)
# Sites that train in one long job per allocation (rules/resident.smk), not one job a round
# (the coordinator of a multi-site run trains nowhere).
RESIDENT = [s for s in SITES if CFG.sites[s].resident and ROLE != "coordinator"]
ROUNDS = list(range(CFG.rounds.count))
# Every round hangs off the one before, and Snakemake builds the DAG recursively, about 40
# frames a round: at Python's default limit (1000) a federation of 27 rounds failed to plan.
# `rule all` asks for the rounds in order (all_targets), so a plain run stays a few rounds
# deep; a target of the last round (the report, `--until`) still recurses through them all.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000 + 200 * CFG.rounds.count))
KEYS = CFG.trust.keys_dir or f"{RUN}/keys"
# Language-model tasks tokenise `data:` and keep the run's tokenizer beside the manifest;
# tasks with their own data format write only shards and the manifest.
USES_TOKENS = load_task(CFG).uses_tokens
# Part jobs that tokenise the shared sources side by side before `shard` packs (only for token data).
SHARD_JOBS = CFG.data.shard_jobs if USES_TOKENS else 1
# Every job reads the validated config from this snapshot. Only the head of a real run writes
# it (and puts `fedhpc` on the jobs' PATH): a dry run, perhaps with other --config overrides
# while a federation runs, and the jobs' own Snakemakes only read what the head wrote.
CONFIG_JSON = f"{RUN}/config.json"
HEAD = workflow.exec_mode == ExecMode.DEFAULT
if HEAD and not workflow.output_settings.dryrun:
    prepare_head(CONFIG_JSON, config)
    # A finished job is seen within the profile's interval, not after the plugin's back-off.
    cap_status_interval()


# With --sdm apptainer, every rule runs in this image; train opts out (see rules/train.smk).
if CFG.container:

    container: CFG.container


wildcard_constraints:
    r=r"\d{4}",
    site="|".join(SITES),
    which="global|candidate",


def rdir(r):
    return f"{RUN}/rounds/{round_name(int(r))}"


def key_files(wildcards=None):
    return [f"{KEYS}/{name}.pub" for name in ["coordinator", *SITES]]


def generated(site):
    """The generated demo domains `site` holds (None: the shared ones)."""
    return [
        d for d in (CFG.data.synth.domains if CFG.data.synth else []) if d.site == site
    ]


def holds_data(site):
    """Whether a site packs data of its own (and so keeps held-out splits to score models on)."""
    own = bool(generated(site)) or any(s.site == site for s in CFG.data.sources)
    # A task with its own data format generates all of it at the coordinator.
    return USES_TOKENS and own


def data_files():
    names = ["manifest.json", "manifest.sig"] + (
        ["tokenizer.json"] if USES_TOKENS else []
    )
    return [f"{RUN}/data/{name}" for name in names]


def shard_outputs():
    """What `shard` writes: with part jobs, the tokenizer is written before them (`shard_tokenizer`)."""
    return [
        f for f in data_files() if SHARD_JOBS == 1 or not f.endswith("tokenizer.json")
    ]


def shard_part_inputs(wildcards=None):
    """The gather's inputs: the tokenizer and every part job's tokens (none when one job does all)."""
    if SHARD_JOBS == 1:
        return []
    parts = [f"{RUN}/data/parts/{part}" for part in range(SHARD_JOBS)]
    return [f"{RUN}/data/tokenizer.json", *parts]


def corpus_inputs(wildcards):
    return [f"{RUN}/data/corpus/corpus.json"] if generated(None) else []


def site_corpus_inputs(wildcards):
    site = wildcards.site
    return [f"{RUN}/data/sites/{site}/corpus/corpus.json"] if generated(site) else []


def catalogue_inputs(wildcards):
    """In one run directory the plan waits for every site's catalogue through the DAG. `ancient`:
    a catalogue rebuilt later (a site joining, new data) must not redo rounds already planned.
    The multi-site coordinator has no such edges: its planner collects what sites published.
    """
    if ROLE != "all":
        return []
    catalogues = [f"{RUN}/data/sites/{s}/catalogue.json" for s in SITES]
    if Path(f"{rdir(wildcards.r)}/plan.json").exists():
        # A plan already made keeps the catalogues it was made from: one appearing later
        # (a site joined) must not make Snakemake redo it.
        catalogues = [c for c in catalogues if Path(c).exists()]
    return [ancient(c) for c in catalogues]


def global_of(wildcards):
    return [
        f"{rdir(wildcards.r)}/global/model.safetensors",
        f"{rdir(wildcards.r)}/global/model.json",
    ]


def plan_inputs(wildcards):
    return [
        f"{RUN}/data/manifest.json",
        *global_of(wildcards),
        *catalogue_inputs(wildcards),
    ]


def eval_holders():
    """Sites that score models on held-out data of their own."""
    return [s for s in SITES if holds_data(s)]


def merge_inputs(wildcards):
    """The coordinator's own part; in multi-site mode also the candidate's offer to the sites."""
    r = wildcards.r
    offer = [f"{rdir(r)}/candidate/bundle.json"] if ROLE == "coordinator" else []
    return [f"{rdir(r)}/candidate/evals/coordinator/eval.json", *offer]


def eval_targets(r, holders):
    """The held-out scores `holders` compute in round r (so they are scheduled): of the
    round's candidate and, in round 0, of the initial model."""
    models = ["global", "candidate"] if r == 0 else ["candidate"]
    return [f"{rdir(r)}/{m}/evals/{s}/eval.json" for m in models for s in holders]


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


def retain_inputs(wildcards):
    """Round r's promotion, and the retention of the round before (so each deletes only its own part)."""
    r = int(wildcards.r)
    earlier = [f"{rdir(r - 1)}/retention.json"] if r > 0 else []
    return [f"{rdir(r + 1)}/global/model.json", *earlier]


def retention_target(r):
    """Round r's retention record, with `retention:` (each depends on the one before)."""
    return [f"{rdir(r)}/retention.json"] if CFG.retention.enabled else []


def train_nodes(wildcards):
    return CFG.sites[wildcards.site].nodes


def train_tasks_per_node(wildcards):
    return CFG.sites[wildcards.site].ranks_per_node


def on_slurm():
    """Submitting to Slurm, or inside a Slurm job (where the job step's inner Snakemake runs
    with a local executor but srun is what starts the ranks)."""
    executor = getattr(workflow.executor_plugin, "name", "")
    return executor in ("slurm", "slurm-jobstep") or "SLURM_JOB_ID" in os.environ


def train_mpi(wildcards):
    """Under Slurm, `srun` launches a multi-rank site (one rank runs in the batch step
    itself); elsewhere `fedhpc train` starts its ranks on the local node."""
    return "srun" if on_slurm() and site_ranks(CFG.sites[wildcards.site]) > 1 else ""


def runs_jobs_here():
    """Whether this Snakemake runs the jobs' shell commands itself (the local executor: a run on
    one machine, or a job's own Snakemake on its compute node), rather than submitting them to
    Slurm or printing them in a dry run."""
    return getattr(workflow.executor_plugin, "name", "") in ("local", "slurm-jobstep")


def train_launch(wildcards, threads, resources):
    """What goes before `fedhpc train`: srun for several ranks, the container runtime for an image."""
    site = wildcards.site
    return train_prefix(site, CFG.sites[site], resources, threads, runs_jobs_here())


def aggregate_inputs(wildcards):
    """The verdicts and, with secure aggregation, the recovery that unmasks the survivors' sum."""
    recovery = [f"{rdir(wildcards.r)}/secagg/recovery.json"]
    verdicts = [f"{rdir(wildcards.r)}/verdicts.json"]
    return verdicts + (recovery if CFG.strategy.secure_aggregation.enabled else [])


def in_batch_step(wildcards=None):
    """An `mpi` resource that runs a single-task job's command in the batch step itself. Its mere
    presence stops the job-step executor from wrapping the command in its own `srun -n1`, which
    drops SLURM_CONF from the environment and so reaches the default cluster, not this one (a
    cluster configured through SLURM_CONF, such as the tests' second cluster)."""
    return ""


def aggregate_tasks(wildcards=None):
    return CFG.strategy.ranks


def aggregate_mpi(wildcards=None):
    return "srun" if on_slurm() and CFG.strategy.ranks > 1 else ""


def aggregate_launch(wildcards, threads, resources):
    """Several MPI ranks split a large checkpoint's tensors: srun in a Slurm job, else mpiexec."""
    return aggregate_prefix(CFG.strategy.ranks, resources, threads)


def previous_publish(wildcards):
    """A site moves to round r once it published round r-1 and its scores of r-1's candidate
    (and, for round 1, of the initial model); to round 0 once it published its catalogue.
    """
    r, site = int(wildcards.r), CFG.exchange.site
    if r == 0:
        return [f"{RUN}/data/sites/{site}/bundle.json"]
    done = [f"{rdir(r - 1)}/sites/{site}/bundle.json"]
    if holds_data(site):
        done.append(f"{rdir(r - 1)}/candidate/evals/{site}/bundle.json")
        if r == 1:
            done.append(f"{rdir(0)}/global/evals/{site}/bundle.json")
    return done


def gather_inputs(wildcards):
    """The plan, and in multi-site mode the round's offer to the sites, before waiting on them."""
    offer = [f"{rdir(wildcards.r)}/bundle.json"] if ROLE == "coordinator" else []
    return [f"{rdir(wildcards.r)}/plan.json", *offer]


def all_targets():
    """What a plain run makes, round by round and the run's summary last. Snakemake builds the
    DAG depth-first from these in this order, so each round's targets reach back only to the
    round before (already planned). With the summary first, its walk ran through every round
    in one chain, and Snakemake copies the chain's visited set at each step (DAG.update): time
    and memory quadratic in rounds (issue 21: 1000 rounds x 16 sites, 39 s and 1.5 GB).
    tests/test_plan_scaling.py holds the walk's depth."""
    if ROLE == "site":
        site = CFG.exchange.site
        # A resident site's jobs pull, train, score and publish every round themselves.
        if site in RESIDENT:
            return [f"{RUN}/data/sites/{site}/bundle.json"]
        scores = [
            f"{rdir(0)}/global/evals/{site}/bundle.json",
            *(f"{rdir(r)}/candidate/evals/{site}/bundle.json" for r in ROUNDS),
        ]
        return [
            f"{RUN}/data/sites/{site}/bundle.json",
            *(f"{rdir(r)}/sites/{site}/bundle.json" for r in ROUNDS),
            *(scores if holds_data(site) else []),
        ]
    done = [f"{RUN}/summary.json", f"{RUN}/report/index.html"]
    if ROLE == "coordinator":
        # Every round's offer and the last global model by name, so that raising
        # rounds.count schedules the new rounds (a finished report alone would not).
        offers = [f"{rdir(r)}/bundle.json" for r in ROUNDS]
        last = f"{rdir(CFG.rounds.count)}/global/model.json"
        return [f"{RUN}/data/bundle.json", *offers, last, *done]
    # A resident site scores the candidates itself, in its job (rules/resident.smk).
    holders, targets = [h for h in eval_holders() if h not in RESIDENT], []
    for r in ROUNDS:
        targets += [
            f"{rdir(r)}/sites/{s}/status.json" for s in SITES if s not in RESIDENT
        ]
        targets += eval_targets(r, holders)
        targets += retention_target(r)
    return [*targets, *done]


def resident_chain(site):
    """The default target's input function for a resident site: its jobs' segment records, each starting
    where the one before stopped, as far as they have run (Snakemake asks again when one ends).
    """

    def segments(wildcards):
        records, r = [], 0
        while r < CFG.rounds.count:
            record = checkpoints.resident.get(r=f"{r:04d}", site=site).output[0]
            records.append(record)
            r = next_segment(record, r)
        return records

    return segments


def next_segment(record, start):
    """The round the job after the one of `record` (which started at `start`) starts at."""
    try:
        nxt = json.loads(Path(record).read_text())["next_round"]
    except (OSError, ValueError, KeyError) as exc:
        raise WorkflowError(f"{record}: not a resident job's record ({exc})") from None
    if not isinstance(nxt, int) or nxt <= start:
        raise WorkflowError(
            f"{record}: next_round {nxt!r} does not move past round {start}"
        )
    return nxt


def resident_inputs(wildcards):
    """What a resident job waits for through the DAG: in one run directory round r's plan and
    model, or for a site that scores candidates round r - 1's candidate (the job before may have
    ended waiting for it, and round r is planned only after its scores are merged); a site of a
    multi-site run pulls each round itself, once its catalogue is published.
    """
    if ROLE == "site":
        return [f"{RUN}/data/sites/{wildcards.site}/bundle.json"]
    r = int(wildcards.r)
    if r > 0 and holds_data(wildcards.site):
        return [f"{rdir(r - 1)}/candidate/model.safetensors"]
    return [f"{rdir(r)}/plan.json", f"{rdir(r)}/global/model.safetensors"]


def resident_threads(wildcards):
    return resident_cores(getattr(workflow.executor_plugin, "name", ""))


# Failure records of training jobs (fedhpc.stages.failures): the head process names this invocation,
# and every job inherits it (a local job from this process, a Slurm job through sbatch
# --export=ALL), so a failure recorded by an earlier invocation (a crashed head, now rerun) is
# history, not final. The Snakemakes a job runs (remote mode, and the subprocess the Slurm job
# step starts under srun) keep the name they inherited.
if HEAD:
    new_invocation()


def job_attempt(wildcards, attempt):
    """This job's attempt, counted by Snakemake from 1."""
    return attempt


def job_attempts(wildcards):
    """Attempts a job has: the workflow's retries + 1 (no rule sets its own). A Slurm job's own
    Snakemake runs with --retries 0 and cannot know them: it takes what the head exported when it
    evaluated this resource, before it submitted the job."""
    if not HEAD:
        return exported_attempts()
    return export_attempts(workflow.execution_settings.retries + 1)


def withdraw_stop_notice():
    """A coordinator's head that starts again takes back its earlier run's stop notice (rule onstart)."""
    if ROLE != "site":
        from fedhpc.stages import stop
        from fedhpc.stages.context import context

        stop.withdraw(context(CONFIG_JSON, with_task=False))


def give_up(stage, round_, which=""):
    """The shell tail of a coordinator job: when the command fails, `fedhpc stop` tells the sites
    (its stop notice) if this was the last attempt, and the job still fails with its status. The
    rule needs resources attempt=job_attempt, attempts=job_attempts."""
    which = f" --which {which}" if which else ""
    return (
        f" || fedhpc stop --config {{params.cfg}} --stage {stage} --round {round_}{which}"
        " --attempt {resources.attempt} --attempts {resources.attempts} --exited $? --log {log} >> {log} 2>&1"
    )
