"""Typed configuration of a federation: one dataclass per component, each field documented.

The dataclasses are the single source of truth: the JSON-Schema in `workflow/schemas/` and
`docs/configuration.md` are generated from them (`fedhpc config schema|docs`).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Any, Literal

from fedhpc.config.fields import NAME_PATTERN, opt
from fedhpc.config.strategy import StrategyConfig
from fedhpc.config.trust import ExchangeConfig, TrustConfig


@dataclass(kw_only=True)
class SiteConfig:
    """Capability profile of one site: what hardware it has and how fast it is."""

    accelerator: Literal["rocm", "cuda", "cpu"] = opt(
        "cpu", "Accelerator family: `rocm` (AMD, e.g. LUMI-G MI250X), `cuda` (NVIDIA, e.g. A100) or `cpu`."
    )
    gpus: int = opt(0, "GPUs (for MI250X: GCDs) the site trains on per job.", minimum=0)
    gpu_memory_gb: float = opt(
        0.0, "Memory of one GPU in GB; with `gpus` > 0 it sets the per-device micro-batch.", minimum=0
    )
    memory_gb: float = opt(
        16.0, "Host memory in GB available to training; sets the micro-batch of CPU sites.", exclusiveMinimum=0
    )
    throughput: float = opt(
        1.0,
        "Relative training speed; unpinned shards are shared in proportion to it so sites finish together.",
        exclusiveMinimum=0,
    )
    energy_weight: float = opt(
        1.0,
        "Relative energy cost per token (recorded in the plan; higher means the site is used less when sites tie).",
        exclusiveMinimum=0,
    )
    nodes: int = opt(1, "Nodes one training job of this site spans.", minimum=1)
    ranks_per_node: int = opt(
        1, "Training processes per node (on GPU nodes one per GPU or GCD, e.g. 8 on LUMI-G).", minimum=1
    )
    engine: Literal["ddp", "fsdp", "deepspeed"] = opt(
        "ddp",
        "How the site's ranks train together: DDP, FSDP (fully sharded) or DeepSpeed ZeRO; "
        "a single rank trains plainly unless `deepspeed`.",
    )
    zero_stage: int = opt(
        1, "DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters.", minimum=1, maximum=3
    )
    compression: Literal["none", "bf16", "fp16", "int8", "topk"] | None = opt(
        None, "This site's update compression scheme; null: `training.compression.scheme`."
    )
    batch_tokens: int | None = opt(
        None, "This site's tokens per optimizer step; null: `training.batch_tokens`.", minimum=8
    )
    container: str | None = opt(
        None,
        "Apptainer/Singularity image (.sif) the site trains in (`srun … singularity|apptainer exec [--nv] <image> fedhpc train …`, whichever runtime the node has); null: the host.",
    )
    resident: bool = opt(
        False,
        "Train round after round in one long job per allocation (rule `resident`) instead of one job per "
        "round: no queue wait, start-up or model build between rounds. Where the site holds held-out data the "
        "job also scores each candidate; in a multi-site run it pulls and publishes through the hub itself. "
        "A site of several ranks keeps its process group from round to round.",
    )
    resident_margin_minutes: float = opt(
        5.0,
        "A resident job starts no round unless its longest round so far plus this much still fits before its "
        "time limit (the rule's `runtime`, or Slurm's end time); it ends instead, and the next job goes on.",
        minimum=0,
    )
    resident_idle_minutes: float | None = opt(
        None,
        "A resident job waiting this long for the next round's plan (or candidate to score) fails: the "
        "coordinator has stopped; a rerun resumes it. null: `rounds.deadline_minutes` + 60.",
        exclusiveMinimum=0,
    )


@dataclass(kw_only=True)
class SynthDomainConfig:
    """One domain of the generated demo corpus: a stochastic source with a known entropy rate."""

    name: str = opt(
        MISSING, "Domain label; becomes the shard domain and the held-out split name.", pattern=NAME_PATTERN
    )
    generator: Literal["markov", "words", "zipf"] = opt(
        "markov",
        "Source kind: `markov` (order-k character chain), `words` (Markov chain over a word list), `zipf` (i.i.d. Zipf characters).",
    )
    site: str | None = opt(None, "Site that owns (pins) this domain's shards; null lets any site train on them.")
    language: str = opt("x-synth", "Language tag written into the manifest.")
    alphabet: int = opt(
        24, "Characters the source draws from (markov, zipf, and spelling of words).", minimum=2, maximum=90
    )
    order: int = opt(2, "Context length of the `markov` chain.", minimum=1, maximum=4)
    words: int = opt(300, "Vocabulary size of the `words` source.", minimum=2)
    concentration: float = opt(
        0.3, "Dirichlet concentration of transition rows; lower is more predictable.", exclusiveMinimum=0
    )


@dataclass(kw_only=True)
class SynthConfig:
    """The generated multi-domain demo corpus (`fedhpc synth`)."""

    bytes_per_domain: int = opt(500_000, "Bytes generated per domain.", minimum=1000)
    doc_bytes: int = opt(2000, "Mean document length in bytes.", minimum=16)
    domains: list[SynthDomainConfig] = opt([], "The domains, one source each.", minItems=1)


@dataclass(kw_only=True)
class SourceConfig:
    """One input data set on disk."""

    name: str = opt(MISSING, "Unique name of the source (used in shard ids).", pattern=NAME_PATTERN)
    format: Literal["text", "jsonl", "parquet", "hdf5"] = opt(
        MISSING, "File format: plain `text`, `jsonl`, `parquet`, or pre-tokenised `hdf5` arrays."
    )
    path: str = opt(MISSING, "File or glob pattern (relative to the working directory).")
    field: str = opt("text", "JSONL key or Parquet column that holds the text.")
    dataset: str = opt("tokens", "HDF5 dataset with token ids: 1-D (one stream) or 2-D (one document per row).")
    split: Literal["file", "line", "blank_line"] = opt(
        "file", "How plain text is cut into documents: whole `file`, each `line`, or at each `blank_line`."
    )
    domain: str = opt(MISSING, "Domain label of every document in this source.", pattern=NAME_PATTERN)
    language: str = opt("und", "Language tag (BCP 47) written into the manifest.")
    source: str | None = opt(None, "Provenance description (URL, collection name); defaults to `path`.")
    licence: str = opt("unknown", "Licence of the data (SPDX identifier where one exists).")
    site: str | None = opt(None, "Site that owns (pins) these shards; null lets any site train on them.")


@dataclass(kw_only=True)
class TokenizerConfig:
    """How text becomes token ids."""

    kind: Literal["byte", "bpe", "pretrained"] = opt(
        "byte",
        "`byte` (256 byte values + end-of-document), `bpe` (trained on the corpus with `tokenizers`) or `pretrained` (a local `tokenizer.json`).",
    )
    vocab_size: int = opt(1024, "Vocabulary size of a trained `bpe` tokenizer.", minimum=260, maximum=1_000_000)
    path: str | None = opt(None, "For `pretrained`: a `tokenizer.json` file or a directory containing one.")
    eos: str = opt("<|endoftext|>", "End-of-document token of `bpe`/`pretrained` tokenizers (added if missing).")


@dataclass(kw_only=True)
class DataConfig:
    """Data sources, tokenisation and sharding."""

    synth: SynthConfig | None = opt(None, "Generate the demo corpus and use it as data (null: only `sources`).")
    sources: list[SourceConfig] = opt([], "Data sets on disk.")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "Tokenizer settings.")
    shard_tokens: int = opt(
        10_000_000, "Target tokens per shard (the last shard of a source may be shorter).", minimum=256
    )
    heldout_fraction: float = opt(
        0.05, "Fraction of each domain's documents kept apart for held-out evaluation.", exclusiveMinimum=0, maximum=0.5
    )
    shard_jobs: int = opt(
        1,
        "Jobs that tokenise the shared sources side by side, each a group of whole files of about equal size "
        "(Snakemake rule `shard_part`; its threads are worker processes); the `shard` job then packs and signs. "
        "The manifest is the same for every value; 1: one `shard` job does all.",
        minimum=1,
        maximum=4096,
    )


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the GPT-style causal language model."""

    n_layer: int = opt(4, "Transformer blocks.", minimum=1)
    n_head: int = opt(4, "Attention heads per block; must divide `d_model`.", minimum=1)
    d_model: int = opt(128, "Width of the residual stream.", minimum=8)
    seq_len: int = opt(128, "Context length in tokens.", minimum=8)
    tie_embeddings: bool = opt(True, "Share the input embedding with the output projection.")


@dataclass(kw_only=True)
class CompressionConfig:
    """How sites encode the updates they send (decoded transparently by the coordinator)."""

    scheme: Literal["none", "bf16", "fp16", "int8", "topk"] = opt(
        "none",
        "`none` (fp32), `bf16`/`fp16` (half the bytes), `int8` (per-block absmax scales, about a quarter), "
        "`topk` (only the largest-magnitude fraction of entries, with their indices).",
    )
    block: int = opt(256, "Elements per scale block of `int8`.", minimum=1)
    topk_fraction: float = opt(0.01, "Fraction of entries `topk` keeps.", exclusiveMinimum=0, maximum=1)
    error_feedback: bool = opt(
        True, "Keep what compression dropped at the site and add it to the next round's update (never sent)."
    )


@dataclass(kw_only=True)
class TrainingConfig:
    """Local training at each site."""

    batch_tokens: int = opt(
        8192, "Tokens per optimizer step at every site (micro-batches are accumulated up to it).", minimum=8
    )
    max_micro_batch: int = opt(64, "Upper bound on sequences per micro-batch, whatever the memory.", minimum=1)
    lr: float = opt(1e-3, "Peak learning rate of the schedule that runs across all rounds.", exclusiveMinimum=0)
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of `lr` (cosine decay).", minimum=0, maximum=1)
    lr_batch_scaling: Literal["none", "sqrt"] = opt(
        "none",
        "`sqrt`: in token language-model tasks, a site stepping on more or fewer tokens than `batch_tokens` (its "
        "own `batch_tokens`) trains at `lr` × √(its tokens per step / `batch_tokens`), Adam's square-root scaling "
        "rule, so it moves about as far per token as a site on the federation's batch; `none`: every site at `lr`.",
    )
    warmup_fraction: float = opt(
        0.05, "Fraction of the whole federation (all rounds) spent warming up, once.", minimum=0, maximum=1
    )
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices only).", minimum=0)
    beta1: float = opt(0.9, "AdamW beta1.", minimum=0, exclusiveMaximum=1)
    beta2: float = opt(0.95, "AdamW beta2.", minimum=0, exclusiveMaximum=1)
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0 disables).", minimum=0)
    precision: Literal["auto", "fp32", "bf16"] = opt(
        "auto", "`auto` uses bf16 autocast where the device supports it fast (CUDA/ROCm), fp32 otherwise."
    )
    keep_optimizer_state: bool = opt(
        True, "Keep AdamW moments at the site between rounds (never sent); false resets them each round."
    )
    local_eval_fraction: float = opt(
        0.05,
        "Fraction of a site's round tokens held back to score loss before/after its local round.",
        exclusiveMinimum=0,
        maximum=0.5,
    )
    log_every: int = opt(10, "Optimizer steps between metric records.", minimum=1)
    device: Literal["auto", "cpu", "cuda"] = opt(
        "auto",
        "Where sites train. `auto`: as each site declares: a `cuda` or `rocm` site on its GPUs (ROCm's appear to "
        "PyTorch as cuda), one per rank, and its job stops with an error naming the site, the torch build and the "
        "visible devices if it sees none or a torch built for the other family, never falling back to the CPU; a "
        "`cpu` site on the CPU. `cpu`: every site on the CPU, whatever it declares: a simulation of GPU sites on one "
        "machine (the embedded demo, the tests). `cuda`: every site on a GPU, `cpu` sites too, whichever family.",
    )
    compression: CompressionConfig = opt(CompressionConfig, "Update compression (sites may override the scheme).")


@dataclass(kw_only=True)
class RoundsConfig:
    """The sequence of federated rounds."""

    count: int = opt(4, "Number of rounds.", minimum=1, maximum=9999)
    tokens_per_round: int = opt(
        50_000_000, "Tokens trained per round across all sites (rounded to whole shards).", minimum=1
    )
    deadline_minutes: float = opt(
        120.0, "How long the coordinator waits for updates after a round is planned.", exclusiveMinimum=0
    )
    quorum: float = opt(
        1.0, "Fraction of planned sites whose updates must arrive by the deadline.", exclusiveMinimum=0, maximum=1
    )
    on_no_quorum: Literal["fail", "wait"] = opt(
        "fail",
        "When the deadline passes without quorum: `fail` the round with a message naming who is missing, or "
        "`wait` past the deadline until quorum is reached (the job's own time limit still applies).",
    )
    late_updates: Literal["drop", "fold"] = opt(
        "fold",
        "An update that arrives after its round closed: `drop` it, or `fold` it into a later round's aggregate "
        "with its weight decayed by staleness (`strategy.staleness`).",
    )
    max_staleness: int = opt(1, "Oldest late update folded, in rounds behind the current one.", minimum=1)
    learn_throughput: bool = opt(
        False,
        "Plan each round with the throughput sites showed in their last receipts (tokens/s) instead of the "
        "declared `throughput`, so stragglers get fewer shared shards. Makes plans depend on timing, so two runs "
        "are no longer bit-identical.",
    )


@dataclass(kw_only=True)
class VerificationConfig:
    """Checks every update passes before it may reach the aggregate."""

    outlier_z: float = opt(
        4.0,
        "Reject an update whose robust z-score of log(norm/sqrt(steps)) across sites exceeds this.",
        exclusiveMinimum=0,
    )
    min_log_scale: float = opt(
        0.5,
        "Floor of the robust spread (natural-log units) so near-identical sites do not make every difference an outlier.",
        exclusiveMinimum=0,
    )
    max_update_norm: float | None = opt(None, "Absolute cap on an update's L2 norm (null: none).", exclusiveMinimum=0)
    divergence_ratio: float = opt(
        1.5, "Reject when the site's local held-out loss after its round exceeds before × this.", exclusiveMinimum=1
    )
    loss_spike_ratio: float = opt(
        3.0,
        "Reject an update whose training curve (metrics.jsonl) logs a loss above this × the median of the "
        "records before it, or any NaN/Inf loss.",
        exclusiveMinimum=1,
    )
    reject_underfit: bool = opt(
        False, "Reject (not only flag) updates that did not lower the site's local held-out loss."
    )


@dataclass(kw_only=True)
class EvaluationConfig:
    """Held-out evaluation of every global model and the gate on it."""

    tokens_per_domain: int = opt(
        65536, "Held-out tokens evaluated per domain (at most what the split holds).", minimum=16
    )
    batch_size: int = opt(16, "Sequences per evaluation batch.", minimum=1)
    max_regression: float = opt(
        0.25,
        "Roll back a round whose held-out loss exceeds the previous global's by more than this fraction.",
        minimum=0,
    )
    deadline_minutes: float = opt(
        30.0,
        "How long after a model is written the coordinator waits for the sites' scores of it on the held-out "
        "data they keep; then it judges the model on the scores that came (and says which are missing).",
        exclusiveMinimum=0,
    )
    evaluators: list[EvaluatorConfig] = opt(
        [],
        "Further evaluators run on every global and candidate model; results go to eval.json, MLflow and the report.",
    )


@dataclass(kw_only=True)
class EvaluatorConfig:
    """One evaluator run on every new global model (and candidate) after the task's own evaluation."""

    name: str = opt(
        MISSING,
        "Built-in evaluator (`domain_perplexity`, `language_perplexity`) or an import path `package.module:Class` "
        "(or `path/to/file.py:Class`, relative to the working directory); see docs/writing-a-task.md.",
    )
    options: dict[str, Any] = opt(
        {},
        "The evaluator's options (built-in ones: [PerplexityOptions](#perplexityoptions)); unknown keys are errors "
        "naming the key.",
    )
    gate: bool = opt(False, "Roll the round back when this evaluator reports `ok: false` (compliance checks).")


@dataclass(kw_only=True)
class RetentionConfig:
    """What a long federation keeps on disk. The audit trail and every signed record are always kept."""

    keep_rounds: int | None = opt(
        None,
        "Keep the site updates and candidate models of the last this many rounds; older ones are deleted after "
        "each promotion (null: keep all). With `rounds.late_updates: fold` at least `rounds.max_staleness`.",
        minimum=1,
    )
    globals_every: int | None = opt(
        None,
        "Keep the global model (and its server-optimiser state) of every this-many-th round, the last one and "
        "those late updates are still verified against; delete the others once their round is done (null: keep all).",
        minimum=1,
    )

    @property
    def enabled(self) -> bool:
        """Whether the run deletes anything: either key set."""
        return self.keep_rounds is not None or self.globals_every is not None


@dataclass(kw_only=True)
class TrackingConfig:
    """Experiment tracking."""

    mlflow: bool = opt(True, "Log the federation to MLflow.")
    uri: str | None = opt(None, "MLflow tracking URI; null uses a SQLite store inside the run directory.")
    experiment: str = opt("fedhpc", "MLflow experiment name.")


@dataclass(kw_only=True)
class TaskConfig:
    """What is trained: the built-in GPT pre-training, another built-in task, or your own."""

    name: str = opt(
        "gpt",
        "Built-in task (`gpt`: the GPT of `model:` pre-trained on `data:`; `hf_causal_lm`: a local Hugging Face "
        "causal LM, optionally with LoRA adapters; `embedding`: sentence-transformers fine-tuning) or an import path "
        "`package.module:Class` (or `path/to/file.py:Class`, relative to the working directory) of a "
        "`fedhpc.tasks.Task` subclass; see docs/writing-a-task.md.",
    )
    options: dict[str, Any] = opt(
        {},
        "The task's options (built-in tasks: [HFCausalLMOptions](#hfcausallmoptions), "
        "[EmbeddingOptions](#embeddingoptions); `gpt` has none, its shape is `model:`); unknown keys are errors "
        "naming the key.",
    )


@dataclass(kw_only=True)
class Config:
    """A federation: who takes part, on what data, training what, for how long."""

    run: str = opt("demo", "Run name; results go to `<output_dir>/<run>/`.", pattern=NAME_PATTERN)
    seed: int = opt(1234, "Seed of every random choice (initial weights, data order, allocation).", minimum=0)
    output_dir: str = opt("results", "Parent directory of run directories.")
    container: str | None = opt(
        None,
        "Apptainer image every rule but training runs in under `snakemake --sdm apptainer`; "
        "training uses `sites.<name>.container` (srun … singularity|apptainer exec). Null: the host's environment.",
    )
    sites: dict[str, SiteConfig] = opt(MISSING, "The sites, by name.", minProperties=1)
    data: DataConfig = opt(DataConfig, "Data.")
    task: TaskConfig = opt(TaskConfig, "Training task.")
    model: ModelConfig = opt(ModelConfig, "Model (of the built-in `gpt` task).")
    training: TrainingConfig = opt(TrainingConfig, "Local training.")
    strategy: StrategyConfig = opt(StrategyConfig, "Aggregation.")
    rounds: RoundsConfig = opt(RoundsConfig, "Rounds.")
    verification: VerificationConfig = opt(VerificationConfig, "Verification.")
    evaluation: EvaluationConfig = opt(EvaluationConfig, "Evaluation.")
    tracking: TrackingConfig = opt(TrackingConfig, "Tracking.")
    retention: RetentionConfig = opt(RetentionConfig, "Retention of models and updates on disk.")
    trust: TrustConfig = opt(TrustConfig, "Trust.")
    exchange: ExchangeConfig = opt(ExchangeConfig, "Multi-site exchange.")
