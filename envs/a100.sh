# Environment of a fedhpc federation on an A100 cluster. Sourced by the head job
# (scripts/sbatch/a100-head.sh, or `fedhpc submit` through site_env in profiles/a100/head.yaml),
# which exports it to every job it submits (sbatch --export=ALL).
# Adjust the interface name to your fabric (ibstat / ip link).
export NCCL_SOCKET_IFNAME=ib0
export NCCL_IB_DISABLE=0
export OMP_NUM_THREADS=16
