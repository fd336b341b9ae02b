# Streaming aggregation of the accepted updates into the round's candidate model.


rule aggregate:
    input:
        aggregate_inputs,
    output:
        model=f"{RUN}/rounds/r{{r}}/candidate/model.safetensors",
        record=f"{RUN}/rounds/r{{r}}/aggregate.json",
    log:
        f"{RUN}/logs/aggregate/r{{r}}.log",
    benchmark:
        f"{RUN}/benchmarks/aggregate/r{{r}}.tsv"
    conda:
        "../envs/fedhpc.yaml"
    threads: 2
    resources:
        attempt=job_attempt,
        attempts=job_attempts,
        tasks=aggregate_tasks,
        mpi=aggregate_mpi,
    params:
        cfg=CONFIG_JSON,
        launch=aggregate_launch,
    shell:
        "{params.launch}fedhpc aggregate --config {params.cfg} --round {wildcards.r} --threads {threads} > {log} 2>&1"
        + give_up("aggregate", "{wildcards.r}")


# Secure aggregation: survivors reveal the seeds they shared with dropped sites.
rule recover:
    input:
        f"{RUN}/rounds/r{{r}}/verdicts.json",
    output:
        f"{RUN}/rounds/r{{r}}/secagg/recovery.json",
    log:
        f"{RUN}/logs/recover/r{{r}}.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc secagg recover --config {params.cfg} --round {wildcards.r} > {log} 2>&1"
