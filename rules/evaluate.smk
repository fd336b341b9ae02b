# Held-out evaluation of every model, and the gate that promotes or rolls back.


rule evaluate_initial:
    input:
        f"{RUN}/rounds/r0000/global/model.safetensors",
    output:
        f"{RUN}/rounds/r0000/global/eval.json",
    log:
        f"{RUN}/logs/evaluate/r0000-global.log",
    conda:
        "../envs/fedhpc.yaml"
    threads: 2
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc evaluate --config {params.cfg} --round 0 --which global --threads {threads} > {log} 2>&1"


rule evaluate:
    input:
        f"{RUN}/rounds/r{{r}}/candidate/model.safetensors",
    output:
        f"{RUN}/rounds/r{{r}}/candidate/eval.json",
    log:
        f"{RUN}/logs/evaluate/r{{r}}-candidate.log",
    conda:
        "../envs/fedhpc.yaml"
    threads: 2
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc evaluate --config {params.cfg} --round {wildcards.r} --which candidate --threads {threads} > {log} 2>&1"


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
    params:
        cfg=CONFIG_JSON,
        prev=previous_round,
    shell:
        "fedhpc promote --config {params.cfg} --round {params.prev} > {log} 2>&1"
