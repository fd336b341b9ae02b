# Multi-site mode: the coordinator offers each round's plan and global model as a signed
# bundle in its run directory (the hub); a site pulls it, trains, and publishes its update.
# Only sites connect, always outbound; every file is checked against its signed index.

if ROLE == "coordinator":

    rule outbox_data:
        input:
            data_files(),
        output:
            f"{RUN}/data/bundle.json",
        log:
            f"{RUN}/logs/exchange/outbox-data.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange outbox-data --config {params.cfg} > {log} 2>&1"

    rule outbox:
        input:
            f"{RUN}/rounds/r{{r}}/plan.json",
            f"{RUN}/rounds/r{{r}}/global/model.safetensors",
            f"{RUN}/rounds/r{{r}}/global/model.json",
        output:
            f"{RUN}/rounds/r{{r}}/bundle.json",
        log:
            f"{RUN}/logs/exchange/outbox-r{{r}}.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange outbox --config {params.cfg} --round {wildcards.r} > {log} 2>&1"


if ROLE == "site":

    rule pull_data:
        output:
            data_files(),
        log:
            f"{RUN}/logs/exchange/pull-data.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange pull-data --config {params.cfg} > {log} 2>&1"

    # Waits on the hub until the coordinator offers round r; one round after another.
    rule pull_round:
        input:
            f"{RUN}/data/manifest.json",
            previous_publish,
        output:
            f"{RUN}/rounds/r{{r}}/plan.json",
            f"{RUN}/rounds/r{{r}}/global/model.safetensors",
            f"{RUN}/rounds/r{{r}}/global/model.json",
        log:
            f"{RUN}/logs/exchange/pull-r{{r}}.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange pull --config {params.cfg} --round {wildcards.r} > {log} 2>&1"

    rule publish:
        input:
            f"{RUN}/rounds/r{{r}}/sites/{{site}}/status.json",
        output:
            f"{RUN}/rounds/r{{r}}/sites/{{site}}/bundle.json",
        log:
            f"{RUN}/logs/exchange/publish-r{{r}}-{{site}}.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange publish --config {params.cfg} --round {wildcards.r} > {log} 2>&1"
