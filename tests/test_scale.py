"""Past two ranks, simulated on the 2 CPU cores: 3 and 8 gloo processes (slow but real). Eight is the case
where every rank holds a single row; the 2-rank tests cover the even middle."""

import json

import pytest
from conftest import ROOT, launcher, run_launcher
from test_resume import _losses, _run_on
from test_train import _worst_relative


@pytest.fixture(scope="module")
def one_rank(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "one.json"
    run_launcher([launcher("torchrun"), "--standalone", "--nproc_per_node", "1", str(ROOT / "tests" / "equivalence_worker.py"),
                  "--shards", str(shards), "--out", str(out), "--precisions", "fp32"])
    return json.loads(out.read_text())


def test_zero_stages_on_8_ranks_equal_one_rank(shards, tmp_path, one_rank):
    """10 steps of a global batch of 8 on 8 ranks: every rank holds one row, so the gathered loss's offsets put
    each rank's row at its own diagonal. ZeRO 1/2/3 in fp32 follow the 1-rank run to fp32 reduction round-off
    (the 2-rank test's bound: 1e-5 relative)."""
    world = 8
    out = tmp_path / f"{world}.json"
    run_launcher([launcher("torchrun"), "--standalone", "--nproc_per_node", str(world),
                  str(ROOT / "tests" / "equivalence_worker.py"), "--shards", str(shards), "--out", str(out),
                  "--precisions", "fp32"], timeout=900)
    many = json.loads(out.read_text())
    for stage in (1, 2, 3):
        worst = _worst_relative(many[f"zero{stage}-fp32"], one_rank[f"zero{stage}-fp32"])
        assert worst < 1e-5, f"world {world} zero{stage}-fp32: worst relative difference {worst:.2e} > 1e-5"


def test_universal_resume_from_8_to_3_ranks_and_back(shards, tmp_path):
    """A global batch of 24 (3 rows x 8 ranks, 8 rows x 3 ranks), ZeRO-3: 2 steps on 8 ranks, 2 more resumed on
    3 (an uneven re-partition: 3 divides no flat buffer evenly), 2 more resumed on 8 again, each resume through
    DeepSpeed's universal format; every step follows a run on 1 rank throughout to fp32 round-off (the 2 -> 1
    resume test's bound)."""
    one, moved = tmp_path / "one", tmp_path / "moved"
    _run_on(shards, one, 1, 3, "train.steps=6", global_batch=24)
    _run_on(shards, moved, 8, 3, "train.steps=6", "train.stop_at_step=2", global_batch=24)
    for before, after, stop in ((8, 3, 4), (3, 8, 6)):
        resumed = _run_on(shards, moved, after, 3, "train.steps=6", f"train.stop_at_step={stop}", "train.resume=auto",
                          global_batch=24)
        assert f"resuming a {before}-rank ZeRO-3 checkpoint on {after} ranks" in resumed.stdout
    expected, got = _losses(one), _losses(moved)
    assert sorted(got) == list(range(1, 7))
    for step in range(3, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got[step], expected[step])
