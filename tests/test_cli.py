"""Entry points: console scripts resolve, the builder CLI end to end, clear errors for bad roots."""

import importlib
import json
import tomllib

import pytest
from conftest import ROOT
from launch_helpers import build_shards_main, synthetic_main


def test_console_scripts_resolve():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"more-train", "more-evaluate", "more-build-shards", "more-synthetic", "more-export", "more-plan",
                            "more-embed", "more-retrieve", "more-finetune"}
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function))


def test_synthetic_then_build_shards_cli(tmp_path, capsys):
    assert synthetic_main(["--out", str(tmp_path / "raw"), "--subjects", "12", "--seed", "1", "--image-size", "96"]) == 0
    assert build_shards_main(["--source", "mimic", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "shards"),
                              "--short-side", "64", "--tokenizer-vocab", "300"]) == 0
    printed = capsys.readouterr().out
    printed = " ".join(printed.split())  # rich wraps long lines at spaces
    assert "'X-ray + ECG': " in printed and "not frontal (PA/AP) image" in printed
    total = sum(json.loads(p.read_text())["samples"] for p in (tmp_path / "shards").glob("*/shards.json"))
    assert total > 0 and (tmp_path / "shards" / "tokenizer" / "tokenizer.json").is_file()


def test_build_shards_names_the_missing_root(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_shards_main(["--source", "mimic", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert "--cxr-root" in capsys.readouterr().err


def test_unread_urls_and_missing_runs_are_one_line_each(tmp_path, capsys):
    """A URL of a scheme this version does not read is refused, not taken for a folder named 'gs:'; evaluating a
    folder that holds no run says so in one line (it was a traceback)."""
    from launch_helpers import evaluate_main

    with pytest.raises(SystemExit):
        build_shards_main(["--source", "mimic", "--root", str(tmp_path), "--out", "gs://bucket/shards"])
    assert "--out gs://bucket/shards: gs:// is not a shard location this version reads" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(tmp_path / "no-run"), "--shards", "az://c/test", "--out",
                          str(tmp_path / "eval")]) == 2
    assert f"input error: config {tmp_path / 'no-run'}/config.yaml: no such file" in capsys.readouterr().err
