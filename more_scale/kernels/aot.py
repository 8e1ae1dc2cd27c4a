"""Compile the fused DropKey kernels ahead of time for real GPUs, on a machine without one.

Triton's CPU interpreter (how the kernels' numbers are tested) admits code that compiled Triton refuses:
plain Python globals, integer arguments specialised into constants, tile shapes `tl.dot` rejects. This
builds every launch the autograd function can issue (`dropkey_attention.forward_launch` /
`backward_launches`, so the arguments are the real ones), specialises it with the Triton runtime's own
binder (the same rules a GPU launch applies: an integer 1 becomes a constant, 16-divisible integers
and 16-aligned pointers get hints), and compiles it with `triton.compile` for an sm_80 / sm_90 target:
ptxas and cuobjdump ship inside the triton wheel. For each cubin it reads registers, stack (local-memory
spills) and shared memory.

  python -m more_scale.kernels.aot --arch 80 90 --json OUT.json     # TRITON_INTERPRET must be unset

Run it under another Triton (e.g. the GPU image's 3.6) with `pip install --no-deps --target DIR
triton==3.6.0` and `PYTHONPATH=DIR`. It uses Triton's runtime internals (`create_function_from_signature`,
`JITFunction._pack_args`), identical in 3.6 and 3.9; a Triton that changes them fails here loudly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One call of the autograd function: what it is launched with."""
    dtype: str
    n: int
    d: int
    p: float = 0.3
    seed: int = 2**61 + 12345
    offset: int = 0
    heads: int = 2


@dataclass
class Build:
    arch: int
    kind: str
    case: Case
    tiles: str  # "BLOCK_M x BLOCK_N / warps w / stages s"
    error: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None  # local memory per thread (stack): > 0 means registers spilled
    shared_bytes: int | None = None


def _tensors(case: Case):
    dtype = DTYPE_NAMES[case.dtype]
    b, h, n, d = 1, case.heads, case.n, case.d
    qkv = torch.zeros(b, n, 3, h, d, dtype=dtype)  # strided q, k, v views of a fused projection, as the ViT passes
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out, grad_out = (torch.zeros(b, h, n, d, dtype=dtype) for _ in range(2))
    lse, delta = (torch.zeros(b * h, n) for _ in range(2))
    dropped_all = torch.zeros(b * h, n, dtype=torch.int8)
    grads = [torch.zeros(b, h, n, d, dtype=dtype) for _ in range(3)]
    return q, k, v, out, grad_out, lse, delta, dropped_all, grads


def launches(case: Case):
    from more_scale.kernels import dropkey_attention as kernels

    q, k, v, out, grad_out, lse, delta, dropped_all, (dq, dk, dv) = _tensors(case)
    return [kernels.forward_launch(q, k, v, out, lse, dropped_all, case.p, case.seed, case.offset),
            *kernels.backward_launches(q, k, v, out, grad_out, lse, dropped_all, delta, dq, dk, dv, case.p,
                                       case.seed, case.offset)]


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if usage is None:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[:300]}")
    registers, stack, _, local = map(int, usage.groups())  # SHARED is the static part only: Triton's is dynamic
    return registers, stack + local


def compile_jit(fn, args: tuple, kwargs: dict, arch: int) -> tuple[int, int, int]:
    """Compile the @triton.jit `fn` as a launch `fn[grid](*args, **kwargs)` would on sm_`arch`; returns
    (registers, spilled bytes per thread, shared memory bytes). Raises what Triton raises."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    registers, spilled = _resources(compiled.asm["cubin"])
    return registers, spilled, compiled.metadata.shared


def compile_case(arch: int, case: Case) -> list[Build]:
    """Every launch of `case`, each with every tile candidate the tuner may pick, compiled for sm_`arch`."""
    builds = []
    for launch in launches(case):
        for tiles in launch.tiles(arch):
            build = Build(arch, launch.kind, case, f"{tiles.block_m}x{tiles.block_n} / {tiles.warps}w / {tiles.stages}s")
            try:
                build.registers, build.spill_bytes, build.shared_bytes = compile_jit(launch.jit_function(), launch.args,
                                                                                    launch.kwargs(tiles), arch)
            except Exception as e:  # the point of the check: report every failure, not just the first
                build.error = f"{type(e).__name__}: {' '.join(str(e).split())[-600:]}"
            builds.append(build)
    return builds


def matrix() -> list[Case]:
    """Every dtype x the head dims of ViT-S/B/L (32, 64, 128) at N 99 (DropToken keep 0.5; N 197 = 14 x 14 + CLS
    specialises and prunes tiles the same way), then the awkward integers at bf16 / D 64: N 1, 16, 17, 129, 197
    and offsets 0, 1, 16, 2^40 (the runtime turns an integer 1 into a constant and hints multiples of 16)."""
    cases = [Case(dtype, 99, d) for dtype in DTYPE_NAMES for d in (32, 64, 128)]
    cases += [Case("bf16", n, 64) for n in (1, 16, 17, 129, 197)]
    cases += [Case("bf16", 99, 64, offset=offset, seed=seed) for offset, seed in ((1, 1), (16, 2**31 - 1), (2**40, 16))]
    cases += [Case("bf16", 99, 64, p=0.0)]  # DropKey off (evaluation): DROP=False compiles its own kernels
    return cases


def compile_all(archs: list[int], cases: list[Case], workers: int = 2) -> list[Build]:
    jobs = [(arch, case) for arch in archs for case in cases]
    with ProcessPoolExecutor(workers) as pool:
        return [b for builds in pool.map(compile_case, *zip(*jobs)) for b in builds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities: 80 A100, 90 H100/H200")
    parser.add_argument("--json", type=Path, help="write every build (errors, registers, spills, shared memory) here")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter compiles nothing; unset it")
    builds = compile_all(args.arch, matrix(), args.workers)
    failed = [b for b in builds if b.error]
    report = {"triton": triton.__version__, "builds": [asdict(b) for b in builds]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    for b in failed[:5]:
        print(f"FAILED sm_{b.arch} {b.kind} {b.case} {b.tiles}: {b.error}", file=sys.stderr)
    print(f"triton {triton.__version__}: {len(builds) - len(failed)} of {len(builds)} builds compiled "
          f"for sm_{', sm_'.join(map(str, args.arch))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
