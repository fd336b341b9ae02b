# Streaming aggregation of the accepted updates into the round's candidate model.


rule aggregate:
    input:
        f"{RUN}/rounds/r{{r}}/verdicts.json",
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
        tasks=aggregate_tasks,
        mpi=aggregate_mpi,
    params:
        cfg=CONFIG_JSON,
        launch=aggregate_launch,
    shell:
        "{params.launch}fedhpc aggregate --config {params.cfg} --round {wildcards.r} --threads {threads} > {log} 2>&1"
