# Close the round on what has arrived by the deadline, then verify every arrived update.


rule gather:
    input:
        gather_inputs,
    output:
        f"{RUN}/rounds/r{{r}}/arrivals.json",
    log:
        f"{RUN}/logs/gather/r{{r}}.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    resources:
        attempt=job_attempt,
        attempts=job_attempts,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc gather --config {params.cfg} --round {wildcards.r} > {log} 2>&1"
        + give_up("gather", "{wildcards.r}")


rule verify:
    input:
        f"{RUN}/rounds/r{{r}}/arrivals.json",
    output:
        f"{RUN}/rounds/r{{r}}/verdicts.json",
    log:
        f"{RUN}/logs/verify/r{{r}}.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    resources:
        attempt=job_attempt,
        attempts=job_attempts,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc verify --config {params.cfg} --round {wildcards.r} > {log} 2>&1"
        + give_up("verify", "{wildcards.r}")
