#!/usr/bin/env bash
# Evaluate a trained run on a shard set (zero-shot AUROC, retrieval recall@K, each beside chance).
#
#   RUN=runs/more-pretrain-1234 SHARDS=/data/shards/test sbatch slurm/evaluate.sh
#
# More GPUs on one node share the embedding (rank 0 scores and writes):
#   RUN=... SHARDS=... sbatch --ntasks=4 --gres=gpu:4 slurm/evaluate.sh
#
# Environment: RUN (required: a training output_dir), SHARDS (required), EVAL_DIR [RUN/eval], PYTHON [python].
#
#SBATCH --job-name=more-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out

set -euo pipefail

RUN="${RUN:?set RUN to the training output_dir}"
SHARDS="${SHARDS:?set SHARDS to a shard directory with shards.json}"
EVAL_DIR="${EVAL_DIR:-${RUN}/eval}"
PYTHON="${PYTHON:-python}"

srun "${PYTHON}" launch/evaluate.py --checkpoint "${RUN}" --shards "${SHARDS}" --out "${EVAL_DIR}"
