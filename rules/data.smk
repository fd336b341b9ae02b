# Identities, the shared data (the demo corpus's shared domains, tokenizer, shards, signed
# manifest), and the initial global model. Sites pack their own data: rules/site.smk.


rule keys:
    output:
        key_files(),
    log:
        f"{RUN}/logs/keys.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc keys ensure --config {params.cfg} > {log} 2>&1"


rule synth:
    # The shared domains only: a site generates its own (rules/site.smk).
    output:
        f"{RUN}/data/corpus/corpus.json",
    log:
        f"{RUN}/logs/synth.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc synth --config {params.cfg} > {log} 2>&1"


if SHARD_JOBS > 1:

    rule shard_tokenizer:
        # Trained (or loaded) once, before the part jobs that all tokenise with it.
        input:
            corpus_inputs,
        output:
            f"{RUN}/data/tokenizer.json",
        log:
            f"{RUN}/logs/shard_tokenizer.log",
        conda:
            "../envs/fedhpc.yaml"
        resources:
            mpi=in_batch_step,
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc shard-tokenizer --config {params.cfg} > {log} 2>&1"

    rule shard_part:
        # One file group of the shared sources, tokenised by worker processes; `shard` packs it.
        input:
            corpus_inputs,
            f"{RUN}/data/tokenizer.json",
        output:
            temp(directory(f"{RUN}/data/parts/{{part}}")),
        log:
            f"{RUN}/logs/shard_part/{{part}}.log",
        wildcard_constraints:
            part=r"\d+",
        conda:
            "../envs/fedhpc.yaml"
        threads: 2
        resources:
            mpi=in_batch_step,
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc shard-part --config {params.cfg} --part {wildcards.part} --workers {threads} > {log} 2>&1"


rule shard:
    input:
        corpus_inputs,
        shard_part_inputs,
        # Only the signer's key: a site's key installed later must not make the data stale.
        f"{KEYS}/coordinator.pub",
    output:
        shard_outputs(),
    log:
        f"{RUN}/logs/shard.log",
    conda:
        "../envs/fedhpc.yaml"
    resources:
        mpi=in_batch_step,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc shard --config {params.cfg} > {log} 2>&1"


rule init:
    input:
        f"{RUN}/data/manifest.json",
    output:
        model=f"{RUN}/rounds/r0000/global/model.safetensors",
        meta=f"{RUN}/rounds/r0000/global/model.json",
    log:
        f"{RUN}/logs/init.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc init --config {params.cfg} > {log} 2>&1"
