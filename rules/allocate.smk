# Each round's plan: which site trains which shards.


rule plan:
    input:
        plan_inputs,
    output:
        f"{RUN}/rounds/r{{r}}/plan.json",
    log:
        f"{RUN}/logs/plan/r{{r}}.log",
    params:
        cfg=CONFIG_JSON,
    localrule: True
    shell:
        "{FEDHPC} plan --config {params.cfg} --round {wildcards.r} > {log} 2>&1"
