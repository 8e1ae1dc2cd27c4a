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
