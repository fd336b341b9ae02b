# Local training: one job per site and round. Its update and receipt are published to the
# round directory; the declared output is only the job's status record, because the
# coordinator's gather step reads the blackboard instead of depending on these jobs.


rule train:
    input:
        plan=f"{RUN}/rounds/r{{r}}/plan.json",
        model=f"{RUN}/rounds/r{{r}}/global/model.safetensors",
    output:
        f"{RUN}/rounds/r{{r}}/sites/{{site}}/status.json",
    log:
        f"{RUN}/logs/train/r{{r}}-{{site}}.log",
    benchmark:
        f"{RUN}/benchmarks/train/r{{r}}-{{site}}.tsv"
    # Ahead of the round's gather job, which polls and must not take the cores first.
    priority: 10
    conda:
        "../envs/fedhpc.yaml"
    # `container:` would wrap srun itself; the site's image goes inside srun instead.
    container:
        None
    threads: 2
    resources:
        nodes=train_nodes,
        tasks_per_node=train_tasks_per_node,
        mpi=train_mpi,
        attempt=job_attempt,
        attempts=job_attempts,
    params:
        cfg=CONFIG_JSON,
        launch=train_launch,
    # Every failure leaves sites/<site>/failure.json for gather (fedhpc.stages.failures): the process
    # writes its own; when it died without a word (killed, crashed) the `||` branch writes one.
    # A deterministic error ends the job with status "failed" and success: nothing retries it.
    shell:
        "{params.launch}fedhpc train --config {params.cfg} --round {wildcards.r} --site {wildcards.site}"
        " --threads {threads} --status {output} --attempt {resources.attempt} --attempts {resources.attempts}"
        " > {log} 2>&1"
        " || fedhpc train --config {params.cfg} --round {wildcards.r} --site {wildcards.site}"
        " --status {output} --attempt {resources.attempt} --attempts {resources.attempts} --exited $? >> {log} 2>&1"
