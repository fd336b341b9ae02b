# What a site runs on the data it holds: it generates (demo) or reads its own sources, packs
# them where they are and signs a catalogue of them; later it scores models on its own
# held-out splits. Only the catalogue and the scores leave the site.


rule synth_site:
    output:
        f"{RUN}/data/sites/{{site}}/corpus/corpus.json",
    log:
        f"{RUN}/logs/synth/{{site}}.log",
    localrule: True
    conda:
        "../envs/fedhpc.yaml"
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc synth --config {params.cfg} --site {wildcards.site} > {log} 2>&1"


rule shard_site:
    input:
        site_corpus_inputs,
        data_files(),
    output:
        f"{RUN}/data/sites/{{site}}/catalogue.json",
    log:
        f"{RUN}/logs/shard/{{site}}.log",
    conda:
        "../envs/fedhpc.yaml"
    resources:
        mpi=in_batch_step,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc shard --config {params.cfg} --site {wildcards.site} > {log} 2>&1"


rule evaluate_site:
    input:
        model=f"{RUN}/rounds/r{{r}}/{{which}}/model.safetensors",
        catalogue=f"{RUN}/data/sites/{{site}}/catalogue.json",
    output:
        f"{RUN}/rounds/r{{r}}/{{which}}/evals/{{site}}/eval.json",
    log:
        f"{RUN}/logs/evaluate/r{{r}}-{{which}}-{{site}}.log",
    # Ahead of the coordinator's merge, which polls for this part and must not take its cores.
    priority: 10
    conda:
        "../envs/fedhpc.yaml"
    threads: 2
    resources:
        mpi=in_batch_step,
    params:
        cfg=CONFIG_JSON,
    shell:
        "fedhpc evaluate --config {params.cfg} --round {wildcards.r} --which {wildcards.which}"
        " --site {wildcards.site} --threads {threads} > {log} 2>&1"
