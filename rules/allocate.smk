# Each round's plan: which site trains which shards.


rule plan:
    input:
        plan_inputs,
    output:
        f"{RUN}/rounds/r{{r}}/plan.json",
    log:
        f"{RUN}/logs/plan/r{{r}}.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    resources:
        attempt=job_attempt,
        attempts=job_attempts,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc plan --config {params.cfg} --round {wildcards.r} > {log} 2>&1"
        + give_up("plan", "{wildcards.r}")
