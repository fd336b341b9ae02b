# Environment of a fedhpc federation on LUMI-G. Sourced by scripts/sbatch/lumi-head.sh; the
# head job exports it to every job it submits (sbatch --export=ALL).
# Per-job MIOpen caches are set by `fedhpc train` itself (job-local temp dirs).

# RCCL/NCCL over the Slingshot interfaces.
export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3
export NCCL_NET_GDR_LEVEL=PHB
# Filesystems visible inside Apptainer/Singularity containers.
export SINGULARITY_BIND=/pfs,/scratch,/projappl,/project,/flash,/appl
export APPTAINER_BIND="$SINGULARITY_BIND"
# One OpenMP thread per core of a rank's 7-core slice.
export OMP_NUM_THREADS=7
