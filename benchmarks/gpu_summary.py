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


def _read(path: Path | None, missing: list[str]) -> list[dict] | dict | None:
    """A results file's content, or None with its name added to `missing` (a step that failed or ran out of time)."""
    if path is None:
        return None
    if not path.is_file():
        missing.append(str(path))
        return None
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def summarise(run: Path, eval_dir: Path, throughput: Path, throughput_7b: Path | None,
              memory_plan: Path | None = None, smoke: Path | None = None,
              throughput_config: Path | None = None) -> tuple[list[dict], list[str]]:
    """The table's rows, and the inputs that were missing (their figures read "-")."""
    missing: list[str] = []
    metrics = _read(run / "metrics.jsonl", missing) or []
    logged = [m for m in metrics if "samples_per_s" in m]
    steady = logged[1:] or logged  # the first window holds start-up: worker spawn, kernel choices, allocator growth
    audit = next((m for m in metrics if "host_syncs_per_step" in m), None)

    def median(key: str) -> float | None:
        return statistics.median(m[key] for m in steady) if steady else None

    e2e = median("samples_per_s")
    rows = (_read(throughput, missing) or {}).get("rows", [])
    plain, engine = _row(rows, RECIPE, "plain"), next((r for r in rows if r["variant"].startswith(RECIPE)
                                                       and r["step"] == "engine ZeRO-2"), None)
    equal = _row(rows, EQUAL_WORK, "plain")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    engine_sps, plain_sps = (engine or {}).get("samples_per_s"), (plain or {}).get("samples_per_s")
    same = (_read(throughput_config, missing) or {}).get("rows", [])  # the run's own config, one batch of its data
    same_plain = next((r["samples_per_s"] for r in same if r["step"] == "plain"), None)
    same_engine = next((r for r in same if r["step"].startswith("engine")), {})
    smoke_rows = (_read(smoke, missing) or {}).get("rows", [])
    fused = [r for r in smoke_rows if r["backend"] == "triton_dropkey"]
    out = [
        {"figure": "fused DropKey kernel on this device, N 99 and 197 vs float64 reference (gpu_smoke.py)",
         "value": sum(r["result"] == "matches the reference" for r in fused) if fused else None, "goal": "2 of 2"},
        {"figure": "end to end: training loop, configs/base.yaml (median of log windows after the first)",
         "value": e2e, "goal": ""},
        {"figure": "end to end: host-device syncs per plain step, all / from more_scale (train.sync_audit_steps)",
         "value": f"{audit['host_syncs_per_step']:g} / {audit['host_syncs_ours_per_step']:g}" if audit else None,
         "goal": "ours 0"},
        {"figure": "compute only, the run's config and data: DeepSpeed engine step (median of 20, CUDA events)",
         "value": same_engine.get("samples_per_s"), "goal": ""},
        {"figure": "compute only, the run's config and data: plain step, fp32 masters + clipping",
         "value": same_plain, "goal": ""},
        {"figure": "the run's config: engine step / plain step (equal work)",
         "value": ratio(same_engine.get("samples_per_s"), same_plain), "goal": ">= 0.90"},
        {"figure": "the run's config: end to end / engine step (what the loader and loop cost)",
         "value": ratio(e2e, same_engine.get("samples_per_s")), "goal": ">= 0.90"},
        {"figure": "compute only: DeepSpeed engine step, ZeRO-2, paper recipe preset, resident batches",
         "value": engine_sps, "goal": ""},
        {"figure": "compute only: plain step, paper recipe preset", "value": plain_sps, "goal": ""},
        {"figure": "paper recipe preset: engine step / plain step", "value": ratio(engine_sps, plain_sps),
         "goal": ">= 0.90"},
        {"figure": "end to end: true MFU (this GPU's measured bf16 peak)", "value": median("mfu"), "goal": ""},
        {"figure": "end to end: data-wait share", "value": median("data_wait_share"), "goal": ""},
        {"figure": "end to end: GPU memory peak (GiB)", "value": max((m.get("mem_peak_gib", 0) for m in steady), default=None),
         "goal": ""},
        {"figure": "equal work (T512, keep 1.0), plain step: true MFU", "value": (equal or {}).get("mfu"), "goal": ">= 0.45"},
        {"figure": f"paper recipe, engine step / original MoRE code ({ORIGINAL_MORE_SAMPLES_PER_S:g} samples/s, quoted)",
         "value": ratio(engine_sps, ORIGINAL_MORE_SAMPLES_PER_S), "goal": ">= 3.5"},
        {"figure": "end to end / original MoRE code", "value": ratio(e2e, ORIGINAL_MORE_SAMPLES_PER_S), "goal": ""},
    ]
    big_rows = (_read(throughput_7b, missing) or {}).get("rows", [])
    big = _row(big_rows, RECIPE, "plain") if big_rows else None
    if big:
        out += [{"figure": "7B-sized text tower, paper recipe, batch 8: samples/s", "value": big["samples_per_s"], "goal": ""},
                {"figure": "7B-sized text tower: GPU memory peak (GiB)", "value": big.get("peak_mem_gib"), "goal": ""}]
    planned = (_read(memory_plan, missing) or {}).get("rows")
    out.append({"figure": "launch/plan.py estimate / measured tensor peak (the run's config, rank 0)",
                "value": planned[0]["planned / measured"] if planned else None, "goal": "0.75-1.25"})
    results = _read(eval_dir / "results.json", missing)
    aurocs = [t["auroc"] for t in (results or {}).get("zero_shot", {}).values() if t.get("auroc") is not None]
    out.append({"figure": f"evaluation of the run: mean zero-shot AUROC ({len(aurocs)} tasks)",
                "value": statistics.mean(aurocs) if aurocs else None, "goal": "finite"})
    return out, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="training output_dir (metrics.jsonl)")
    parser.add_argument("--eval", type=Path, required=True, help="evaluate.py --out folder")
    parser.add_argument("--throughput", type=Path, required=True, help="throughput.py JSON with plain and engine rows")
    parser.add_argument("--throughput-7b", type=Path)
    parser.add_argument("--memory-plan", type=Path, help="memory_plan.py JSON (planned vs measured peak)")
    parser.add_argument("--smoke", type=Path, help="gpu_smoke.py JSON (kernels against the reference)")
    parser.add_argument("--throughput-config", type=Path, help="throughput.py --config JSON: the run's config, compute only")
    args = parser.parse_args()
    rows, missing = summarise(args.run, args.eval, args.throughput, args.throughput_7b, args.memory_plan, args.smoke,
                              args.throughput_config)
    for r in rows:
        r["value"] = "-" if r["value"] is None else r["value"] if isinstance(r["value"], str) else round(float(r["value"]), 4)
    command = ("python benchmarks/gpu_summary.py --run RUN --eval EVAL --throughput " + args.throughput.name
               + (f" --throughput-7b {args.throughput_7b.name}" if args.throughput_7b else ""))
    print(write(f"gpu_summary_{DEVICE}", rows, command,
                "Samples/s on one device. The end-to-end run reads synthetic 224 px shards with augmentation on; "
                "'the run's config' rows time its model on one batch of its own shards, resident on the device (equal "
                "work); the preset rows use random inputs with ~128-token reports."
                + (f" Missing (their figures read -): {', '.join(missing)}." if missing else "")))
    if missing:
        print("missing: " + ", ".join(missing))


if __name__ == "__main__":
    main()
