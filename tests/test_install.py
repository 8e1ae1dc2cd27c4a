"""A plain (non-editable) install works from anywhere: configs and DeepSpeed JSONs ship as package data."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT


def test_installed_package_trains_outside_the_source_tree(shards, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # the new venv borrows this one's dependencies (and pip, setuptools) through a .pth line; .pth files
    # in a borrowed folder are not run, so this checkout's editable install stays invisible there
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "source"  # pip builds in the source folder: a copy keeps build/ out of the checkout
    shutil.copytree(ROOT / "more_scale", source / "more_scale", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, cwd=tmp_path, env=env, capture_output=True)
    where = subprocess.run([python, "-c", "import more_scale; print(more_scale.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the installed copy, not the checkout

    out = tmp_path / "run"
    env.update(OMP_NUM_THREADS="1", MASTER_PORT="29517")
    result = subprocess.run([str(venv / "bin" / "more-train"), "--config", "tiny-cpu", f"data.train={shards / 'train'}",
                             f"output_dir={out}", "data.batch_size=4", "data.workers=0", "train.steps=2",
                             "train.warmup_steps=1", "train.log_every=1", "train.deepspeed_config=zero1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "done: step 2" in result.stdout
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
