#!/usr/bin/env bash
# Build WebDataset shards as a job array: task i builds every N-th shard of the plan (N = array size),
# and task 0 submits the merge (shards.json per split + tokenizer) as a job that waits for the whole array.
#
#   ROOT=/data/physionet OUT=/data/shards sbatch slurm/build_shards.sh
#   ROOT=/data/physionet OUT=/data/shards BUILD_ARGS="--window-days 30" sbatch --array=0-31 slurm/build_shards.sh
#   SOURCE=ptbxl ROOT=/data/ptb-xl OUT=/data/ptbxl_shards sbatch slurm/build_shards.sh
#   SOURCE=csv ROOT=/data/mine OUT=/data/mine_shards BUILD_ARGS="--manifest /data/mine/manifest.csv" sbatch ...
#
# Environment: ROOT (required: mimic: holds mimic-cxr-jpg/, mimic-cxr-reports/, mimic-iv-ecg/; ptbxl: the
# PTB-XL folder; csv: the base of the manifest's relative paths), OUT (required),
# SOURCE [mimic], PYTHON [python], WORKERS [cpus per task], BUILD_ARGS (more build_shards.py flags),
# LOG_DIR: where the merge job writes its log [.].
# Same inputs and flags give byte-identical shards whatever the array size.
#
#SBATCH --job-name=more-shards
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --error=%x-%A_%a.out

set -euo pipefail

ROOT="${ROOT:?set ROOT to the raw dataset folder}"
OUT="${OUT:?set OUT to the shard output folder}"
SOURCE="${SOURCE:-mimic}"
PYTHON="${PYTHON:-python}"
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}"
LOG_DIR="${LOG_DIR:-.}"
read -r -a build_args <<< "${BUILD_ARGS:-}"

parts="${SLURM_ARRAY_TASK_COUNT:-1}"
part=$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))
command=("${PYTHON}" launch/build_shards.py --source "${SOURCE}" --root "${ROOT}" --out "${OUT}" "${build_args[@]}")

if [ "${part}" -eq 0 ] && [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  merge_job=$(sbatch --parsable --dependency="afterok:${SLURM_ARRAY_JOB_ID}" --job-name="${SLURM_JOB_NAME}-merge" \
    --ntasks=1 --cpus-per-task=1 --output="${LOG_DIR}/${SLURM_JOB_NAME}-${SLURM_ARRAY_JOB_ID}-merge.out" \
    --wrap="$(printf '%q ' "${command[@]}") --merge-index")
  echo "merge job ${merge_job} runs after array ${SLURM_ARRAY_JOB_ID}"
fi
echo "part ${part} of ${parts} on $(hostname)"
"${command[@]}" --num-parts "${parts}" --part "${part}" --workers "${WORKERS}"
