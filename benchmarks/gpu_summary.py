"""The one table benchmarks/gpu_check.sh ends with: the training loop end to end beside the same work
compute-only (DeepSpeed engine step and plain torch step on batches already on the GPU), their ratios
against the goals, true MFU, data-wait share and memory. Writes benchmarks/results/gpu_summary_<device>.md|json.

  python benchmarks/gpu_summary.py --run RUN --eval EVAL --throughput results/throughput_paper_bf16_cuda.json \
      [--throughput-7b results/throughput_paper-7b_bf16_cuda.json] [--memory-plan results/memory_plan_cuda.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import DEVICE, write

ORIGINAL_MORE_SAMPLES_PER_S = 304.0  # the public MoRE code on one H200, T512, batch 64, fp16 AMP (shared/notes/gpu-h200.md)
RECIPE = "ours, paper recipe"
EQUAL_WORK = "ours, equal work"


def _row(rows: list[dict], variant: str, step: str) -> dict | None:
    return next((r for r in rows if r["variant"].startswith(variant) and r["step"] == step), None)


def summarise(run: Path, eval_dir: Path, throughput: Path, throughput_7b: Path | None,
              memory_plan: Path | None = None) -> list[dict]:
    logged = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "samples_per_s" in m]
    steady = logged[1:] or logged  # the first window holds start-up: worker spawn, kernel choices, allocator growth
    e2e = statistics.median(m["samples_per_s"] for m in steady)
    rows = json.loads(throughput.read_text())["rows"]
    plain, engine = _row(rows, RECIPE, "plain"), next((r for r in rows if r["variant"].startswith(RECIPE)
                                                       and r["step"] == "engine ZeRO-2"), None)
    equal = _row(rows, EQUAL_WORK, "plain")
    out = [
        {"figure": "end to end: training loop, configs/base.yaml (median of log windows after the first)",
         "value": e2e, "goal": ""},
        {"figure": "compute only: DeepSpeed engine step, ZeRO-2, paper recipe, resident batches",
         "value": engine["samples_per_s"] if engine else None, "goal": ""},
        {"figure": "compute only: plain torch step, paper recipe", "value": plain["samples_per_s"] if plain else None,
         "goal": ""},
        {"figure": "engine step / plain step", "value": engine["samples_per_s"] / plain["samples_per_s"]
         if engine and plain else None, "goal": ">= 0.90"},
        {"figure": "end to end / engine step", "value": e2e / engine["samples_per_s"] if engine else None,
         "goal": ">= 0.90"},
        {"figure": "end to end: true MFU (this GPU's measured bf16 peak)", "value": statistics.median(m["mfu"] for m in steady),
         "goal": ""},
        {"figure": "end to end: data-wait share", "value": statistics.median(m["data_wait_share"] for m in steady),
         "goal": ""},
        {"figure": "end to end: GPU memory peak (GiB)", "value": max(m["mem_peak_gib"] for m in steady), "goal": ""},
        {"figure": "equal work (T512, keep 1.0), plain step: true MFU", "value": equal["mfu"] if equal else None,
         "goal": ">= 0.45"},
        {"figure": f"paper recipe, engine step / original MoRE code ({ORIGINAL_MORE_SAMPLES_PER_S:g} samples/s, quoted)",
         "value": engine["samples_per_s"] / ORIGINAL_MORE_SAMPLES_PER_S if engine else None, "goal": ">= 3.5"},
        {"figure": "end to end / original MoRE code", "value": e2e / ORIGINAL_MORE_SAMPLES_PER_S, "goal": ""},
    ]
    if throughput_7b is not None and throughput_7b.is_file():
        big = _row(json.loads(throughput_7b.read_text())["rows"], RECIPE, "plain")
        if big:
            out += [{"figure": "7B-sized text tower, paper recipe, batch 8: samples/s", "value": big["samples_per_s"],
                     "goal": ""},
                    {"figure": "7B-sized text tower: GPU memory peak (GiB)", "value": big.get("peak_mem_gib"), "goal": ""}]
    if memory_plan is not None and memory_plan.is_file():
        planned = json.loads(memory_plan.read_text())["rows"][0]
        out.append({"figure": "launch/plan.py estimate / measured tensor peak (the run's config, rank 0)",
                    "value": planned["planned / measured"], "goal": "0.75-1.25"})
    results = eval_dir / "results.json"
    if results.is_file():
        r = json.loads(results.read_text())
        aurocs = [t["auroc"] for t in r["zero_shot"].values() if t.get("auroc") is not None]
        out.append({"figure": f"evaluation of the run: mean zero-shot AUROC ({len(aurocs)} tasks, {r['samples']} samples)",
                    "value": statistics.mean(aurocs) if aurocs else None, "goal": "finite"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="training output_dir (metrics.jsonl)")
    parser.add_argument("--eval", type=Path, required=True, help="evaluate.py --out folder")
    parser.add_argument("--throughput", type=Path, required=True, help="throughput.py JSON with plain and engine rows")
    parser.add_argument("--throughput-7b", type=Path)
    parser.add_argument("--memory-plan", type=Path, help="memory_plan.py JSON (planned vs measured peak)")
    args = parser.parse_args()
    rows = summarise(args.run, args.eval, args.throughput, args.throughput_7b, args.memory_plan)
    for r in rows:
        r["value"] = "-" if r["value"] is None else round(float(r["value"]), 4)
    command = ("python benchmarks/gpu_summary.py --run RUN --eval EVAL --throughput " + args.throughput.name
               + (f" --throughput-7b {args.throughput_7b.name}" if args.throughput_7b else ""))
    print(write(f"gpu_summary_{DEVICE}", rows, command,
                "Samples/s at micro-batch 64 on one device. The end-to-end run reads synthetic 224 px shards with "
                "augmentation on; the compute-only rows use random inputs with ~128-token reports."))


if __name__ == "__main__":
    main()
