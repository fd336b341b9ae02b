# Resident sites (sites.<name>.resident): one job trains the site's rounds one after another and,
# where the site holds held-out data, scores each candidate (fedhpc.stages.resident). It ends with
# its segment record; where the next job starts is known only then, so the rule is a checkpoint
# and `rule all` follows the chain (resident_chain).


checkpoint resident:
    input:
        resident_inputs,
    output:
        f"{RUN}/rounds/r{{r}}/sites/{{site}}/resident.json",
    log:
        f"{RUN}/logs/resident/r{{r}}-{{site}}.log",
    wildcard_constraints:
        site="|".join(RESIDENT),
    priority: 10
    conda:
        "../envs/fedhpc.yaml"
    container:
        None
    threads: resident_threads
    # A site of several ranks: srun starts them under Slurm, as for rule train.
    resources:
        nodes=train_nodes,
        tasks_per_node=train_tasks_per_node,
        mpi=train_mpi,
        attempt=job_attempt,
        # The workflow's retries apply to both training rules alike.
        attempts=job_attempts,
    params:
        cfg=CONFIG_JSON,
        launch=train_launch,
        threads=lambda wildcards, threads: max(1, threads),
        walltime=lambda wildcards, resources: resources.get("runtime", 0),
        evaluate=lambda wildcards: "--evaluate" if holds_data(wildcards.site) else "",
    # Snakemake exports OMP_NUM_THREADS={threads}, which is 0 here (resident_threads).
    shell:
        "export OMP_NUM_THREADS={params.threads}; {params.launch}fedhpc resident --config {params.cfg} --round {wildcards.r} --site {wildcards.site}"
        " --threads {params.threads} --record {output} --walltime-minutes {params.walltime}"
        " --attempt {resources.attempt} --attempts {resources.attempts} {params.evaluate} > {log} 2>&1"
        " || fedhpc resident --config {params.cfg} --round {wildcards.r} --site {wildcards.site} --record {output}"
        " --attempt {resources.attempt} --attempts {resources.attempts} --exited $? >> {log} 2>&1"
