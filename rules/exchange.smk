# Multi-site mode: the coordinator offers the shared data, each round's plan and global model
# and each round's candidate as signed bundles in its run directory (the hub); a site pulls
# them, and publishes its data catalogue, its update and its scores on its own held-out data.
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

    rule outbox_candidate:
        input:
            f"{RUN}/rounds/r{{r}}/candidate/model.safetensors",
        output:
            f"{RUN}/rounds/r{{r}}/candidate/bundle.json",
        log:
            f"{RUN}/logs/exchange/outbox-r{{r}}-candidate.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange outbox-candidate --config {params.cfg} --round {wildcards.r} > {log} 2>&1"


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

    rule publish_catalogue:
        input:
            f"{RUN}/data/sites/{{site}}/catalogue.json",
        output:
            f"{RUN}/data/sites/{{site}}/bundle.json",
        log:
            f"{RUN}/logs/exchange/publish-catalogue-{{site}}.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange publish-catalogue --config {params.cfg} > {log} 2>&1"

    rule pull_candidate:
        input:
            f"{RUN}/rounds/r{{r}}/sites/{CFG.exchange.site}/bundle.json",
        output:
            f"{RUN}/rounds/r{{r}}/candidate/model.safetensors",
        log:
            f"{RUN}/logs/exchange/pull-r{{r}}-candidate.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange pull-candidate --config {params.cfg} --round {wildcards.r} > {log} 2>&1"

    rule publish_eval:
        input:
            f"{RUN}/rounds/r{{r}}/{{which}}/evals/{{site}}/eval.json",
        output:
            f"{RUN}/rounds/r{{r}}/{{which}}/evals/{{site}}/bundle.json",
        log:
            f"{RUN}/logs/exchange/publish-r{{r}}-{{which}}-eval-{{site}}.log",
        localrule: True
        conda:
            "../envs/fedhpc.yaml"
        params:
            cfg=CONFIG_JSON,
        shell:
            "fedhpc exchange publish-eval --config {params.cfg} --round {wildcards.r} --which {wildcards.which}"
            " > {log} 2>&1"

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
