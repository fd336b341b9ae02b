"""The workflow's stages, one module each, each called by the `fedhpc <verb>` a Snakemake rule runs.

The stages: shard (and synth), init, plan, train, resident, gather, verify, aggregate, evaluate
(and merge-eval), promote, retain, track, report, stop and exchange; plus what they share: the
context every stage is handed, a round's progress and status, failed attempts and Slurm jobs.
Stages never call each other: they read and write the round directory. May import everything
below them.
"""
