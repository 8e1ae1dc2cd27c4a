import json
import re

import pytest

from more_scale.config import ConfigError, config_from_dict, config_to_dict, load_config

TINY = "configs/tiny-cpu.yaml"


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)


def test_yaml_then_dotted_overrides_with_types():
    cfg = load_config(TINY, ["train.steps=20", "data.batch_size=8", "train.lr=1e-3", "model.text.lora_targets=[query]",
                             "train.precision=bf16"])
    assert cfg.train.steps == 20 and cfg.data.batch_size == 8 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.text.lora_targets == ("query",) and cfg.train.precision == "bf16"
    mixed = load_config(TINY, ["data.train=a/train::b/train", "data.train_weights=[3,1]", "data.mode=resampled"])
    assert mixed.data.train_weights == (3.0, 1.0)
    assert cfg.model.cxr.width == 64  # from the YAML
    assert cfg.loss.text_cxr == 1.0  # from the dataclass default
    with pytest.raises(AttributeError):
        cfg.train.steps = 3  # frozen


def test_round_trip_through_dict():
    cfg = load_config(TINY, ["train.steps=7", "train.warmup_steps=2"])
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key train.stepz"),
    ("model.cxr.widht=3", "unknown key model.cxr.widht"),
    ("train.steps=abc", "train.steps: expected int"),
    ("data.image_size=96", "unknown key data.image_size"),  # the input size is said once, in model.cxr
    ("model.ecg.samples=8", "model.ecg.samples (8) too short for the Conv1d stem (kernel 5, twice)"),
    ("train.precision=fp16", "train.precision must be bf16 or fp32"),
    ("model.cxr.heads=5", "model.cxr.width (64) is not divisible by model.cxr.heads (5)"),
    ("model.ecg.drop_token_keep=0", "model.ecg.drop_token_keep must be in (0, 1]"),
    ("train.warmup_steps=500", "train.warmup_steps (500) must be in [0, train.steps=200]"),
    ("train.deepspeed_config=nope.json", "train.deepspeed_config: no such file nope.json"),
    ("train", "expected dotted.key=value"),
    ("data.mode=shuffled", "data.mode must be resampled or epoch, got 'shuffled'"),
    ("data.train_weights=[1,2]", "data.train_weights has 2 weights for 1 sources in data.train"),
    ("data.cxr_crop_scale=[0.5]", "data.cxr_crop_scale must be two numbers 0 < lo <= hi <= 1, got (0.5,)"),
    ("data.ecg_warp=1.5", "data.ecg_warp must be in [0, 1), got 1.5"),
    # a URL this version does not read would be taken for a relative folder named "gs:"
    ("data.train=/shards/train::gs://b/train", "data.train: gs://b/train: gs:// is not a shard location this version reads"),
    ("data.validate=az://c/validate", "data.validate: az://c/validate: az:// is not a shard location"),
])
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TINY, [override])


def test_deepspeed_json_may_not_hold_typed_fields(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        load_config(TINY, [f"train.deepspeed_config={bad}"])


def test_train_entry_point_rejects_before_starting_processes(capsys):
    from launch_helpers import train_main

    assert train_main(["--config", TINY, "train.nonsense=1"]) == 2
    assert "unknown key train.nonsense" in capsys.readouterr().err
