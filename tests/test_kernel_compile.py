"""Every Triton kernel the project launches, compiled ahead of time for sm_80 and sm_90 on this GPU-less
machine, with our Triton and with the GPU image's (3.6): what the CPU interpreter lets through and a GPU
refuses (a plain Python global, an integer argument specialised into a constant, a tile shape) fails here.
Registers spilled to local memory at the paper's head dim are a failure too: they cost the kernel its speed."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("triton")
TRITON_GPU_IMAGE = ROOT / ".venv" / "triton-3.6"  # `pip install --no-deps --target` by `make install`
TRITONS = {"ours": None, "3.6": TRITON_GPU_IMAGE}


def _compiler_env(side_folder=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter compiles nothing
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (side_folder, ROOT) if p)
    return env


def _run(args, side_folder=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=_compiler_env(side_folder), capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("triton_build", TRITONS)
def test_every_launch_compiles_for_sm80_and_sm90_without_spills(triton_build, tmp_path):
    side = TRITONS[triton_build]
    if side is not None and not (side / "triton").is_dir():
        pytest.fail(f"{side} is missing: `make install` puts the GPU image's Triton there")
    report_path = tmp_path / "builds.json"
    result = _run(["-m", "more_scale.kernels.aot", "--arch", "80", "90", "--json", str(report_path)], side)
    assert report_path.exists(), result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    if side is not None:
        assert report["triton"] == "3.6.0", f"{side} holds Triton {report['triton']}"
    builds = report["builds"]
    failed = [(b["arch"], b["kind"], b["case"], b["tiles"], b["error"]) for b in builds if b["error"]]
    assert not failed, f"{len(failed)} of {len(builds)} builds failed, first: {failed[0]}"
    assert result.returncode == 0, result.stderr[-3000:]
    # the whole matrix was built: 3 dtypes x 3 head dims, N 1..197, offsets 0 / 1 / 16 / 2^40, DropKey off
    cases = {(b["case"]["dtype"], b["case"]["d"], b["case"]["n"], b["case"]["offset"], b["case"]["p"]) for b in builds}
    assert {(dt, d, 99, 0, 0.3) for dt in ("bf16", "fp16", "fp32") for d in (32, 64, 128)} <= cases
    assert {("bf16", 64, n, 0, 0.3) for n in (1, 16, 17, 129, 197)} <= cases
    assert {("bf16", 64, 99, off, 0.3) for off in (1, 16, 2**40)} | {("bf16", 64, 99, 0, 0.0)} <= cases
    assert {b["kind"] for b in builds} == {"fwd", "delta", "dkdv", "dq"}
    assert {b["arch"] for b in builds} == {80, 90}
    spilled = [(b["arch"], b["kind"], b["case"]["dtype"], b["case"]["d"], b["tiles"], b["spill_bytes"]) for b in builds
               if b["case"]["dtype"] in ("bf16", "fp16") and b["case"]["d"] <= 64 and b["spill_bytes"]]
    assert not spilled, f"registers spilled to local memory: {spilled}"
    assert all(b["registers"] <= 255 and b["shared_bytes"] <= 227 * 1024 for b in builds)  # sm_90's per-thread / per-block limits


def test_the_check_catches_a_kernel_the_interpreter_runs(tmp_path):
    """A plain Python global inside @triton.jit (the bug that reached main): fine interpreted, refused compiled."""
    probe = """
import torch, triton, triton.language as tl
from more_scale.kernels.aot import compile_jit
SCALE = 2.0
@triton.jit
def double(X, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(X + i, tl.load(X + i, mask=i < N) * SCALE, mask=i < N)
try:
    compile_jit(double, (torch.zeros(16), 16), {"BLOCK": 16}, 90)
except Exception as e:
    print("refused:", type(e).__name__, e)
else:
    print("compiled")
"""
    (tmp_path / "probe.py").write_text(probe)  # a file: @triton.jit reads its function's source
    result = _run([str(tmp_path / "probe.py")], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout and "SCALE" in result.stdout, result.stdout[-2000:]
