"""Operating a federation: `fedhpc run` (the Snakemake head), `fedhpc submit` (the head as a
Slurm job), the launch prefix of site jobs, containers, the doctor's preflight checks,
export and serve. May import everything below the command line.
"""
