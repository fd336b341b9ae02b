# Tracking in MLflow, and the run's summary and HTML report.


rule track:
    input:
        track_inputs,
    output:
        f"{RUN}/rounds/r{{r}}/tracked.json",
    log:
        f"{RUN}/logs/track/r{{r}}.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc track --config {params.cfg} --round {wildcards.r} > {log} 2>&1"


rule report:
    input:
        report_inputs(),
    output:
        summary=f"{RUN}/summary.json",
        html=f"{RUN}/report/index.html",
    log:
        f"{RUN}/logs/report.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc report --config {params.cfg} > {log} 2>&1"
