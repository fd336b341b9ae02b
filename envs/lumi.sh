# Environment of a fedhpc federation on LUMI-G. Sourced by the head job (scripts/sbatch/lumi-head.sh,
# or `fedhpc submit` through site_env in profiles/lumi*/head.yaml), which exports it to every job
# it submits (sbatch --export=ALL).
# Per-job MIOpen caches are set by `fedhpc train` itself (job-local temp dirs).

# RCCL/NCCL over the Slingshot interfaces.
export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3
export NCCL_NET_GDR_LEVEL=PHB
# libfabric's Slingshot (CXI) provider in processes that fork, without huge pages for its queues
# (the rocm image sets them too).
export CXI_FORK_SAFE=1
export CXI_FORK_SAFE_HP=1
export FI_CXI_DISABLE_CQ_HUGETLB=1
# Bound into Apptainer/Singularity containers: the filesystems, then what RCCL's network plugin
# in the rocm image needs (Slurm's spool, Cray's libfabric, libcxi); without those RCCL between
# nodes falls back to TCP sockets. `fedhpc container check rocm` checks this line.
export SINGULARITY_BIND=/pfs,/scratch,/projappl,/project,/flash,/appl,/var/spool/slurmd,/opt/cray,/usr/lib64/libcxi.so.1
export APPTAINER_BIND="$SINGULARITY_BIND"
# One OpenMP thread per core of a rank's 7-core slice.
export OMP_NUM_THREADS=7
