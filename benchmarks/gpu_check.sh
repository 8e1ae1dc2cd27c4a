#!/usr/bin/env bash
# The one prepared GPU check, under 8 minutes on one H100/H200, nothing fetched at run time:
#   wheels the image lacks (from .whl/, made by benchmarks/fetch_gpu_wheels.sh) -> synthetic 224 px shards ->
#   `deepspeed --num_gpus 1 launch/train.py` on configs/base.yaml (~100 steps) -> evaluation of that run ->
#   matmul peak, attention backends, the fused DropKey kernel against FlexAttention / SDPA, the compute-only
#   throughput sweep (plain and DeepSpeed engine steps; DropKey on and off),
#   launch/plan.py's estimate against the measured peak of a base.yaml run (benchmarks/memory_plan.py),
#   the 7B-sized text tower -> one summary table (benchmarks/gpu_summary.py) -> RESULTS.md.
# Every step runs under `timeout`; a failed step is reported and the rest go on. Results land in
# benchmarks/results/*_cuda.*; the logs and results are bundled into $OUT/gpu_check.tgz when $OUT is set.
#
#   bash benchmarks/gpu_check.sh              on the GPU machine (device tool: carry [".whl"])
#   bash benchmarks/gpu_check.sh --dry-run    on a CPU: the same steps at toy sizes, to check the plumbing
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
WORK=${WORK:-/tmp/more_gpu_check}
LOGS=$WORK/logs
rm -rf "$WORK" && mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}

if ! "$PY" -c "import deepspeed, webdataset, wids, wfdb, albumentations" 2>/dev/null; then
  [[ -d .whl ]] || { echo "missing packages and no .whl/ (run benchmarks/fetch_gpu_wheels.sh where PyPI is reachable)"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

RESULTS=benchmarks/results
if ((DRY)); then  # toy sizes on the CPU; their tables go to $WORK, never over measured ones
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 MORE_RESULTS_DIR=$WORK/results
  RESULTS=$WORK/results
  DEVICE=cpu SUBJECTS=60 WORKERS=2 BUILD=(--short-side 80)
  TRAIN=(--config configs/tiny-cpu.yaml data.batch_size=8 data.workers=1 train.steps=6 train.warmup_steps=2
         train.log_every=2 train.save_every=100)
  SWEEP=(--preset small --batch 4 --steps 1 --precision fp32 --engine-zero 2 --only "reference fp32,ours")
  PRESET=small PRECISION=fp32
else
  DEVICE=cuda SUBJECTS=1500 WORKERS=16 BUILD=()
  TRAIN=(--config configs/base.yaml model.text.random_init=true data.workers=12 train.steps=100 train.warmup_steps=10 train.log_every=20
         train.save_every=1000)
  # shellcheck disable=SC2054  # "1,2" is one argument: the ZeRO stages to sweep
  SWEEP=(--preset paper --batch 64 --steps 3 --precision bf16 --engine-zero 1,2)
  PRESET=paper PRECISION=bf16
fi

STATUS=0
BUDGET=${BUDGET:-540}  # seconds for all steps: the device tool stops a command at 600 s, and the bundle must get out
BEGIN=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: under timeout (its own limit, or what is left of BUDGET), log, show the tail
  local name=$1 limit=$2 start rc left
  shift 2
  left=$((BUDGET - ($(date +%s) - BEGIN)))
  ((left < limit)) && limit=$left
  if ((limit < 5)); then echo "$name skipped: the budget is spent" | tee -a "$LOGS/steps.txt"; STATUS=1; return 1; fi
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$LOGS/steps.txt"
  tail -n 15 "$LOGS/$name.log"
  ((rc == 0)) || STATUS=1
  return $rc
}

if ((DRY)); then lscpu | grep -E "Model name|Flags" | cut -c1-150; else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
"$PY" - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
for name in ("flash_attn", "xformers", "triton", "peft", "transformers", "deepspeed"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'no'}")
PY

step synthetic 60 "$PY" launch/make_synthetic.py --out "$WORK/raw" --subjects $SUBJECTS --seed 0 --workers $WORKERS
step shards 60 "$PY" launch/build_shards.py --source mimic --root "$WORK/raw" --out "$WORK/shards" --workers $WORKERS "${BUILD[@]}"
step train 180 "$PY" -m deepspeed.launcher.runner --num_gpus 1 launch/train.py "${TRAIN[@]}" \
  data.train="$WORK/shards/train" output_dir="$WORK/run"
step evaluate 45 "$PY" launch/evaluate.py --checkpoint "$WORK/run" --shards "$WORK/shards/test" --out "$WORK/eval"
step peak 20 "$PY" benchmarks/peak.py
step attention 20 "$PY" benchmarks/attention.py --batch $((DRY ? 2 : 64))
step dropkey_kernel 60 "$PY" benchmarks/dropkey_attention.py
step throughput 150 "$PY" benchmarks/throughput.py "${SWEEP[@]}"
step memory_plan 60 "$PY" benchmarks/memory_plan.py --config "${TRAIN[1]}" --world 1 "${TRAIN[@]:2}" train.steps=3 \
  train.warmup_steps=1 data.train="$WORK/shards/train"
if ((!DRY)); then
  step tower_7b 60 "$PY" benchmarks/throughput.py --preset paper-7b --batch 8 --steps 2 --precision bf16 \
    --only "ours, paper recipe" --engine-zero ""
fi
step summary 20 "$PY" benchmarks/gpu_summary.py --run "$WORK/run" --eval "$WORK/eval" \
  --throughput "$RESULTS/throughput_${PRESET}_${PRECISION}_${DEVICE}.json" \
  --throughput-7b "$RESULTS/throughput_paper-7b_bf16_${DEVICE}.json" --memory-plan "$RESULTS/memory_plan_${DEVICE}.json"
((DRY)) || "$PY" benchmarks/report.py

cat "$LOGS/steps.txt"
if [[ -n ${OUT:-} ]]; then
  cp "$WORK/run/metrics.jsonl" "$LOGS/train_metrics.jsonl" 2>/dev/null
  cp "$WORK/eval/results.json" "$LOGS/eval_results.json" 2>/dev/null
  cp -r "$RESULTS" "$WORK/results_out" && cp benchmarks/RESULTS.md "$WORK/results_out/"
  tar czf "$OUT/gpu_check.tgz" -C "$WORK" logs results_out
  echo "bundled into $OUT/gpu_check.tgz"
fi
exit $STATUS
