# Held-out evaluation where the held-out data is, and the gate that promotes or rolls back.
# The coordinator scores models on the shared domains; each site on its own (rules/site.smk);
# merge_eval waits for the parts (evaluation.deadline_minutes) and combines them. The initial
# model is judged once; every later global model inherits its candidate's scores (promote).


rule evaluate_shared:
    input:
        f"{RUN}/rounds/r{{r}}/{{which}}/model.safetensors",
    output:
        f"{RUN}/rounds/r{{r}}/{{which}}/evals/coordinator/eval.json",
    log:
        f"{RUN}/logs/evaluate/r{{r}}-{{which}}-coordinator.log",
    conda:
        "../envs/fedhpc.yaml"
    threads: 2
    resources:
        attempt=job_attempt,
        attempts=job_attempts,
        mpi=in_batch_step,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc evaluate --config {params.cfg} --round {wildcards.r} --which {wildcards.which}"
        " --threads {threads} > {log} 2>&1"
        + give_up("evaluate_shared", "{wildcards.r}", "{wildcards.which}")


rule merge_eval_initial:
    input:
        f"{RUN}/rounds/r0000/global/evals/coordinator/eval.json",
        # the plan knows which sites' catalogues (and held-out splits) take part
        f"{RUN}/rounds/r0000/plan.json",
    output:
        f"{RUN}/rounds/r0000/global/eval.json",
    log:
        f"{RUN}/logs/evaluate/r0000-global-merge.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    resources:
        attempt=job_attempt,
        attempts=job_attempts,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc merge-eval --config {params.cfg} --round 0 --which global > {log} 2>&1"
        + give_up("merge_eval_initial", "0", "global")


rule merge_eval:
    input:
        merge_inputs,
    output:
        f"{RUN}/rounds/r{{r}}/candidate/eval.json",
    log:
        f"{RUN}/logs/evaluate/r{{r}}-candidate-merge.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    resources:
        attempt=job_attempt,
        attempts=job_attempts,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc merge-eval --config {params.cfg} --round {wildcards.r} --which candidate > {log} 2>&1"
        + give_up("merge_eval", "{wildcards.r}", "candidate")


rule promote:
    input:
        unpack(promote_inputs),
    output:
        model=f"{RUN}/rounds/r{{nxt}}/global/model.safetensors",
        meta=f"{RUN}/rounds/r{{nxt}}/global/model.json",
        eval=f"{RUN}/rounds/r{{nxt}}/global/eval.json",
    log:
        f"{RUN}/logs/promote/r{{nxt}}.log",
    wildcard_constraints:
        nxt=r"(?!0000)\d{4}",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    resources:
        attempt=job_attempt,
        attempts=job_attempts,
    params:
        cfg=CONFIG_JSON,
        prev=previous_round,
    shell:
        "fedhpc promote --config {params.cfg} --round {params.prev} > {log} 2>&1"
        + give_up("promote", "{params.prev}")


# `retention:` deletes what it no longer keeps once a round is promoted, one round after another.
rule retain:
    input:
        retain_inputs,
    output:
        f"{RUN}/rounds/r{{r}}/retention.json",
    log:
        f"{RUN}/logs/retain/r{{r}}.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc retain --config {params.cfg} --round {wildcards.r} > {log} 2>&1"
