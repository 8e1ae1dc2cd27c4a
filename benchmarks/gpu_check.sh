#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100: device facts, the measured matmul peak, the attention
# backends (flash-attn / xformers when their wheels are installed), the throughput sweep at paper size in
# bf16 beside the reference-style baseline, and the same step with a 7B-sized LoRA text tower.
# Results land in benchmarks/results/*.md|json; `python benchmarks/report.py` rebuilds RESULTS.md from them.
#
#   bash benchmarks/gpu_check.sh            (BATCH=32 STEPS=3 to change the sweep)
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${BATCH:-32}
STEPS=${STEPS:-3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ("flash_attn", "xformers", "triton", "peft", "transformers", "deepspeed"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'no'}")
PY
python benchmarks/peak.py --size 8192
python benchmarks/attention.py --batch 64
python benchmarks/throughput.py --preset paper --batch "$BATCH" --steps "$STEPS" --precision bf16 --batch-sweep 8,64
python benchmarks/throughput.py --preset paper-7b --batch 8 --steps 2 --precision bf16 \
  --only "ours, paper recipe" || echo "7B-sized text tower did not run (see the error above: memory?)"
python benchmarks/report.py
