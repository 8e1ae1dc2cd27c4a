"""benchmarks/gpu_check.sh --dry-run end to end on the CPU: every step exits 0 within its limit and the run ends
with the summary table, so the GPU's minutes go to measuring, not to a broken script."""

import os
import re
import subprocess
import sys
import tarfile

from conftest import ROOT

STEPS = ("smoke", "synthetic", "shards", "train", "evaluate", "same_work", "peak", "attention", "dropkey_kernel",
         "throughput", "memory_plan", "summary")


def test_gpu_check_dry_run_runs_every_step_and_ends_with_the_summary(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it where it is needed
    env.update(WORK=str(work), OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=540)
    steps = (work / "logs" / "steps.txt").read_text()
    codes = dict(re.findall(r"^(\w+) rc=(\d+)", steps, re.M))
    assert set(codes) == set(STEPS), steps
    assert all(code == "0" for code in codes.values()), f"{steps}\n{result.stdout[-4000:]}"
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"step limits (\d+)s \+ summary 20s of BUDGET 540s", result.stdout)
    summary = (work / "results" / "gpu_summary_cpu.md").read_text()
    assert "Missing" not in summary, summary  # every input the summary reads was written
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|", summary, re.M))
    assert rows["fused DropKey kernel on this device, N 99 and 197 vs float64 reference (gpu_smoke.py)"] == "2"
    syncs = rows["end to end: host-device syncs per plain step, all / from more_scale (train.sync_audit_steps)"]
    assert syncs.endswith("/ 0"), syncs
    assert float(rows["the run's config: engine step / plain step (equal work)"]) > 0
    auroc = next(v for k, v in rows.items() if k.startswith("evaluation of the run: mean zero-shot AUROC"))
    assert 0 <= float(auroc) <= 1, auroc
    with tarfile.open(out / "gpu_check.tgz") as bundle:
        assert "logs/steps.txt" in bundle.getnames()
