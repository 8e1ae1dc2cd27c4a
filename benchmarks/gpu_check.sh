#!/usr/bin/env bash
# The one prepared GPU check, under 9 minutes on one H100/H200, nothing fetched at run time:
#   wheels the image lacks (from .whl/, made by benchmarks/fetch_gpu_wheels.sh) -> the attention kernels built and
#   checked against the reference on this GPU (benchmarks/gpu_smoke.py) -> synthetic 224 px shards ->
#   `deepspeed --num_gpus 1 launch/train.py` on configs/base.yaml (~100 steps) -> evaluation of that run ->
#   the same config's plain and engine steps on one batch of its shards (equal work, 20 timed steps) ->
#   matmul peak, attention backends, the fused DropKey kernel against FlexAttention / SDPA, the compute-only
#   throughput sweep (plain and DeepSpeed engine steps; DropKey on and off),
#   launch/plan.py's estimate against the measured peak of a base.yaml run (benchmarks/memory_plan.py)
#   -> one summary table (benchmarks/gpu_summary.py, whatever exists, naming what is missing) -> RESULTS.md.
# (The 7B-sized tower is not timed here: its random init draws ~6.7e9 normals on the host, minutes.)
# Every step runs under `timeout` with its own limit; the limits add up to the budget less the summary's
# share, which is kept for it. A failed step is reported and the rest go on. Results land in
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

if ! "$PY" -c "import deepspeed, webdataset, wfdb, albumentations" 2>/dev/null; then
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
         train.log_every=2 train.save_every=100 train.sync_audit_steps=2)
  SMOKE_ENV=(env TRITON_INTERPRET=1)  # the Triton kernel runs on CPU tensors only interpreted
  SWEEP=(--preset small --batch 4 --steps 1 --precision fp32 --engine-zero 2 --only "reference fp32|ours")
  PRESET=small PRECISION=fp32
else
  DEVICE=cuda SUBJECTS=800 WORKERS=16 BUILD=()
  TRAIN=(--config configs/base.yaml model.text.random_init=true data.workers=12 train.steps=100 train.warmup_steps=10
         train.log_every=20 train.save_every=1000 train.sync_audit_steps=3)
  SMOKE_ENV=()
  # shellcheck disable=SC2054  # "1,2" is one argument: the ZeRO stages to sweep
  SWEEP=(--preset paper --batch 64 --steps 3 --precision bf16 --engine-zero 1,2)
  PRESET=paper PRECISION=bf16
fi

STATUS=0
BUDGET=${BUDGET:-540}  # seconds for all steps: the device tool stops a command at 600 s, and the bundle must get out
SUMMARY_S=20  # kept for the summary whatever happens before it
declare -A LIMIT=([smoke]=30 [synthetic]=30 [shards]=30 [train]=115 [evaluate]=30 [peak]=15 [attention]=20
                  [dropkey_kernel]=50 [same_work]=60 [throughput]=100 [memory_plan]=40)
PLANNED=0
for name in "${!LIMIT[@]}"; do PLANNED=$((PLANNED + LIMIT[$name])); done
if ((PLANNED + SUMMARY_S > BUDGET)); then
  echo "step limits add up to ${PLANNED}s + ${SUMMARY_S}s summary, over BUDGET=${BUDGET}s: lower them"; exit 2
fi
echo "step limits ${PLANNED}s + summary ${SUMMARY_S}s of BUDGET ${BUDGET}s"
BEGIN=$(date +%s)
step() {  # step NAME COMMAND...: under timeout (its limit, or what is left of the budget less the summary's share)
  local name=$1 limit=${LIMIT[$1]:-$SUMMARY_S} reserve=$SUMMARY_S start rc left
  shift
  [[ $name == summary ]] && reserve=0
  left=$((BUDGET - reserve - ($(date +%s) - BEGIN)))
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

step smoke "${SMOKE_ENV[@]}" "$PY" benchmarks/gpu_smoke.py
step synthetic "$PY" launch/make_synthetic.py --out "$WORK/raw" --subjects $SUBJECTS --seed 0 --workers $WORKERS
step shards "$PY" launch/build_shards.py --source mimic --root "$WORK/raw" --out "$WORK/shards" --workers $WORKERS "${BUILD[@]}"
step train "$PY" -m deepspeed.launcher.runner --num_gpus 1 launch/train.py "${TRAIN[@]}" \
  data.train="$WORK/shards/train" output_dir="$WORK/run"
step evaluate "$PY" launch/evaluate.py --checkpoint "$WORK/run" --shards "$WORK/shards/test" --out "$WORK/eval"
step same_work "$PY" benchmarks/throughput.py --steps $((DRY ? 3 : 20)) "${TRAIN[@]}" train.sync_audit_steps=0 \
  data.train="$WORK/shards/train"
step peak "$PY" benchmarks/peak.py
step attention "$PY" benchmarks/attention.py --batch $((DRY ? 2 : 64))
step dropkey_kernel "$PY" benchmarks/dropkey_attention.py
step throughput "$PY" benchmarks/throughput.py "${SWEEP[@]}"
step memory_plan "$PY" benchmarks/memory_plan.py --config "${TRAIN[1]}" --world 1 "${TRAIN[@]:2}" train.steps=3 \
  train.warmup_steps=1 train.sync_audit_steps=0 data.train="$WORK/shards/train"
step summary "$PY" benchmarks/gpu_summary.py --run "$WORK/run" --eval "$WORK/eval" \
  --throughput "$RESULTS/throughput_${PRESET}_${PRECISION}_${DEVICE}.json" \
  --memory-plan "$RESULTS/memory_plan_${DEVICE}.json" --smoke "$RESULTS/gpu_smoke_${DEVICE}.json" \
  --throughput-config "$RESULTS/throughput_config_$(basename "${TRAIN[1]}" .yaml)_${DEVICE}.json"
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
