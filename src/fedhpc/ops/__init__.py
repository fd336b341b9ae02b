"""Operating a federation: running the workflow, its preflight, and handing over its models.

`fedhpc run` (the Snakemake head), `fedhpc submit` (the head as a Slurm job), the launch prefix
of site jobs, containers, the doctor's preflight checks, provenance of a global model, export
and serve. May import everything below the command line.
"""
