"""One module per workflow stage, each called by a `fedhpc <verb>` that a Snakemake rule runs:
shard, plan, train, gather, verify, aggregate, evaluate, promote, report, track; plus what
the stages share about a round's progress, failed attempts and Slurm jobs. Stages never call
each other: they read and write the round directory. May import everything below them.
"""
