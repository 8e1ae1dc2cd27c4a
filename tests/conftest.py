"""Shared fixtures: one small synthetic raw dataset and its shards per session (real files)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = ROOT.parent / "shared" / "data" / "real"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # shm op built once
# Triton kernels run on CPU tensors only in Triton's interpreter, which is read when a kernel module is imported
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def raw_root(tmp_path_factory) -> Path:
    from more_scale.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("raw")
    make_synthetic(root, subjects=80, seed=3, image_size=160, workers=2)
    return root


@pytest.fixture(scope="session")
def shards(raw_root, tmp_path_factory) -> Path:
    from more_scale.data.build import BuildOptions, write_shards
    from more_scale.data.mimic import mimic_samples

    out = tmp_path_factory.mktemp("shards")
    options = BuildOptions(short_side=80, samples_per_shard=16, tokenizer_vocab=600)
    pairs, _ = mimic_samples(raw_root / "mimic-cxr-jpg", raw_root / "mimic-cxr-reports", raw_root / "mimic-iv-ecg", options)
    write_shards(pairs, out, options, {"source": "mimic"})
    return out


@pytest.fixture(scope="session")
def tokenizer(shards):
    from more_scale.data.tokenizer import load_tokenizer

    return load_tokenizer(shards / "tokenizer")


@pytest.fixture(scope="session")
def two_step_run(shards, tmp_path_factory) -> Path:
    """A finished 1-rank tiny run of 2 steps on `shards`, shared by every module: a test that changes a run copies it."""
    from test_faults_train import _command, _run

    run = tmp_path_factory.mktemp("two_step") / "run"
    result = _run(_command(shards, run, "train.steps=2", "train.save_every=2", ranks=1))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run


def tiny_overrides(shards: Path, out: Path) -> list[str]:
    return [f"data.train={shards / 'train'}", f"output_dir={out}", "data.batch_size=4", "data.workers=1",
            "data.augment=true"]


def run_launcher(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a distributed launcher (torchrun / deepspeed) from the repository root; fail with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def launcher(name: str) -> str:
    return str(Path(sys.executable).parent / name)
