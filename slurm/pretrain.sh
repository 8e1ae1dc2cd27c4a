#!/usr/bin/env bash
# Pretrain MoRE on a SLURM cluster: one task per GPU, rendezvous from the allocation, requeue on preemption.
#
#   sbatch slurm/pretrain.sh
#   CONFIG=configs/base.yaml OVERRIDES="train.steps=20000 data.train=/data/shards/train" sbatch --nodes=4 slurm/pretrain.sh
#   sbatch --partition=cpu --gres=none --ntasks-per-node=2 slurm/pretrain.sh     (CPU partition, gloo)
#
# Environment (all optional):
#   CONFIG      YAML experiment config                       [configs/base.yaml]
#   OVERRIDES   dotted key=value overrides, space separated   []
#   OUTPUT_DIR  run folder (checkpoints, metrics)            [runs/<job name>-<job id>]
#   PYTHON      interpreter with more_scale installed        [python]
#   LAUNCHER    srun: one srun task per GPU (no ssh/pdsh) | deepspeed: DeepSpeed's launcher, hostfile
#               generated from the allocation              [srun]
# Every #SBATCH default below can be overridden on the sbatch command line.
# Training exits 75 after writing a checkpoint when SLURM signals USR1 (time limit near, preemption);
# this script then requeues the job and the next run resumes with train.resume=auto.
#
#SBATCH --job-name=more-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out

set -uo pipefail

CONFIG="${CONFIG:-configs/base.yaml}"
OVERRIDES="${OVERRIDES:-}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
PYTHON="${PYTHON:-python}"
LAUNCHER="${LAUNCHER:-srun}"
EXIT_REQUEUE=75  # more_scale.train.preemption.EXIT_REQUEUE

MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"  # per job: jobs sharing a node do not collide
export MASTER_ADDR MASTER_PORT
read -r -a overrides <<< "${OVERRIDES}"
args=(launch/train.py --config "${CONFIG}" "output_dir=${OUTPUT_DIR}" train.resume=auto "${overrides[@]}")

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} tasks," \
     "master ${MASTER_ADDR}:${MASTER_PORT}, ${LAUNCHER}, ${CONFIG} ${OVERRIDES}"

case "${LAUNCHER}" in
  srun)
    # rank, world and local rank come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (more_scale.dist)
    srun --label --kill-on-bad-exit=0 "${PYTHON}" "${args[@]}"
    status=$?
    ;;
  deepspeed)
    hostfile="${OUTPUT_DIR}/hostfile-${SLURM_JOB_ID}"
    mkdir -p "${OUTPUT_DIR}"
    scontrol show hostnames "${SLURM_JOB_NODELIST}" | sed "s/\$/ slots=${SLURM_NTASKS_PER_NODE}/" > "${hostfile}"
    # --launcher slurm starts the ranks with srun: no ssh/pdsh, so no ssh reachability check either
    "${PYTHON}" -m deepspeed.launcher.runner --hostfile "${hostfile}" --launcher slurm --no_ssh_check \
      --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" "${args[@]}"
    status=$?
    ;;
  *)
    echo "LAUNCHER must be srun or deepspeed, got '${LAUNCHER}'" >&2
    exit 2
    ;;
esac

if [ "${status}" -eq "${EXIT_REQUEUE}" ]; then
  echo "training checkpointed for preemption: requeueing job ${SLURM_JOB_ID}"
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
