# Environment of a fedhpc federation on an A100 cluster. Sourced by scripts/sbatch/a100-head.sh.
# Adjust the interface name to your fabric (ibstat / ip link).
export NCCL_SOCKET_IFNAME=ib0
export NCCL_IB_DISABLE=0
export OMP_NUM_THREADS=16
