"""After training: the public inference API (more_scale.load) and the export, opened by the libraries people
already use (transformers, peft, safetensors), offline."""

import csv
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_faults_train import ENV

from more_scale.config import input_shape

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def trained(two_step_run, tmp_path_factory):
    """The shared 1-rank tiny run of 2 steps and its export, with the shards' input format recorded."""
    from launch_helpers import export_main

    export = tmp_path_factory.mktemp("inference") / "export"
    assert export_main(["--checkpoint", str(two_step_run), "--out", str(export)]) == 0
    return two_step_run, export


def test_embeddings_of_raw_files_equal_the_shards_through_evaluation(trained, shards, raw_root):
    """more_scale.load(export).embed_cxr(JPEG file) and .embed_ecg(WFDB record) apply the build's preprocessing
    (CLAHE, short side, JPEG q95; resampling, baseline removal) and evaluation's crop: the same vectors as the
    shard samples built from those files, within fp32 round-off; the run folder loads to the same model."""
    import more_scale
    from more_scale.config import load_config
    from more_scale.eval.embed import embed

    run, export = trained
    model = more_scale.load(export)
    assert not any(p.requires_grad for p in model.model.parameters()) and not model.model.training
    cfg = load_config(run / "config.yaml")
    emb = embed(model.model, shards / "test", cfg.data, input_shape(cfg.model), model.tokenizer)
    rows = [i for i in range(len(emb.keys)) if emb.masks["cxr"][i] and emb.masks["ecg"][i]][:4]
    images = [next(raw_root.rglob(f"{emb.meta[i]['dicom_id']}.jpg")) for i in rows]
    records = [next(raw_root.rglob(f"{emb.meta[i]['ecg_id']}.hea")).with_suffix("") for i in rows]
    np.testing.assert_allclose(model.embed_cxr(images, batch_size=3), emb.vectors["cxr"][rows], atol=1e-5)
    np.testing.assert_allclose(model.embed_ecg(records), emb.vectors["ecg"][rows], atol=1e-5)
    from_run = more_scale.load(run)
    np.testing.assert_allclose(from_run.embed_cxr(images), emb.vectors["cxr"][rows], atol=1e-5)
    texts = ["Enlarged cardiac silhouette.", "Normal heart size."]
    vectors = model.embed_text(texts)
    assert vectors.shape == (2, cfg.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(from_run.embed_text(texts), vectors, atol=1e-5)
    long_report = " ".join(["Heart size is normal."] * 200)  # far past max_text_tokens: cut where training cut
    assert model.embed_text([long_report]).shape == (1, cfg.model.embed_dim)
    scores = model.zero_shot(model.embed_cxr(images), "cxr")
    cardiomegaly = scores["Cardiomegaly"]
    assert set(cardiomegaly) == {"positive", "negative", "score"} and cardiomegaly["positive"].shape == (4,)
    np.testing.assert_allclose(cardiomegaly["score"], cardiomegaly["positive"] - cardiomegaly["negative"], atol=1e-6)


@pytest.mark.parametrize("pairing", ["joined", "pair"])
def test_a_report_embeds_as_training_tokenised_it(trained, shards, pairing):
    """embed_text(report) equals the text vector of a training batch whose sample has only that report, under
    either data.text_pairing: the pairing travels in the input format, so a pair-trained model's queries get
    the pair's special tokens (the two tokenisations differ, so this tells them apart)."""
    from dataclasses import replace

    import more_scale
    from more_scale.config import load_config
    from more_scale.data.pipeline import SkipCounter, collate, stored_sample
    from more_scale.data.reports import tokenize_reports

    run, export = trained
    model = more_scale.load(export)
    model.inputs = replace(model.inputs, text_pairing=pairing)
    cfg = load_config(run / "config.yaml")
    data, shape = replace(cfg.data, text_pairing=pairing), input_shape(cfg.model)
    stored = [stored_sample(shards / "test", i) for i in range(3)]
    for member, side in (("rad.txt", "radiology"), ("ecg.txt", "cardiology")):
        texts = [s[member].decode().strip() for s in stored]
        samples = [{"key": str(i), "cxr": None, "ecg": None, "meta": {},
                    "reports": (t, "") if side == "radiology" else ("", t)} for i, t in enumerate(texts)]
        batch = collate(samples, model.tokenizer, data, shape, SkipCounter())
        with torch.no_grad():
            trained_view = model.model.encode("text", batch.input_ids, batch.attention_mask).numpy()
        np.testing.assert_allclose(model.embed_text(texts, side), trained_view, atol=1e-5)
    joined, paired = (tokenize_reports(model.tokenizer, [("Clear lungs.", "")], p, 64)["input_ids"][0].tolist()
                      for p in ("joined", "pair"))
    assert joined != paired


def test_the_readme_quick_start_runs(trained, raw_root, tmp_path):
    """The README's quick start, as written, in a folder laid out as `make demo` leaves it."""
    run, export = trained
    block = re.search(r"<!-- quick start -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no quick-start block"
    (tmp_path / "demo").mkdir()
    shutil.copytree(export, tmp_path / "demo" / "export")
    (tmp_path / "demo" / "raw").symlink_to(raw_root)
    (tmp_path / "demo" / "run").symlink_to(run)
    result = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    similarities = [float(x) for x in re.findall(r"-?\d+\.\d+", result.stdout)]
    assert len(similarities) == 2 and all(-1 <= s <= 1 for s in similarities), result.stdout


def test_the_export_opens_with_transformers_peft_and_safetensors_offline(trained):
    """The LM and its adapter through peft's own AutoPeftModel (the adapter names its base), the tokenizer with
    the length trained with, the towers through safetensors; config.json says where the LM weights are."""
    from peft import AutoPeftModel, PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    run, export = trained
    meta = json.loads((export / "config.json").read_text())
    assert meta["model"]["text"]["pretrained"] == "text_base" and meta["model"]["text"]["random_init"] is False
    assert meta["inputs"]["cxr_short_side"] == 80 and meta["inputs"]["ecg_rate_hz"] == 100.0
    assert meta["trained"]["step"] == 2 and meta["trained"]["checkpoint"] == "step_00000002"
    tokenizer = AutoTokenizer.from_pretrained(export / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == meta["inputs"]["max_text_tokens"]
    tokens = tokenizer(["Heart size is normal. " * 200], truncation=True, return_tensors="pt")
    assert tokens["input_ids"].shape[1] == meta["inputs"]["max_text_tokens"]
    adapted = AutoPeftModel.from_pretrained(str(export / "text_adapter"), local_files_only=True)
    again = PeftModel.from_pretrained(AutoModel.from_pretrained(export / "text_base", local_files_only=True),
                                      str(export / "text_adapter"))
    with torch.no_grad():
        a = adapted(**tokens).last_hidden_state
        b = again(**tokens).last_hidden_state
    torch.testing.assert_close(a, b)
    import more_scale

    ours = more_scale.load(export).model.encoders["text"].lm
    with torch.no_grad():
        torch.testing.assert_close(ours(**tokens).last_hidden_state, a, rtol=1e-5, atol=1e-5)
    towers = load_file(str(export / "model.safetensors"))
    assert any(k.startswith("encoders.cxr.") for k in towers) and not any(k.startswith("encoders.text.lm.") for k in towers)
    card = (export / "README.md").read_text()
    assert "short side 80 px" in card and "100 Hz" in card and "step: 2" in card


def test_an_export_without_an_input_format_is_refused_by_load(trained, tmp_path):
    import more_scale
    from more_scale.inference import InputsUnknown

    _, export = trained
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    meta = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**meta, "inputs": None}))
    with pytest.raises(InputsUnknown, match="the input format .* was not recorded"):
        more_scale.load(copy)


def test_more_embed_writes_vectors_and_an_index_and_more_retrieve_ranks_them(trained, raw_root, tmp_path, capsys):
    """A folder of X-rays with one unreadable file among them: every readable one embedded as the API embeds it,
    the bad one skipped and named; more-retrieve then lists the top K by similarity to a query."""
    from launch_helpers import embed_main, retrieve_main

    import more_scale

    _, export = trained
    folder = tmp_path / "xrays"
    folder.mkdir()
    images = sorted(raw_root.rglob("*.jpg"))[:5]
    for n, image in enumerate(images):
        shutil.copy(image, folder / f"{n}.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    assert embed_main(["--model", str(export), "--images", str(folder), "--out", str(tmp_path / "index"),
                       "--batch-size", "4"]) == 0
    vectors = np.load(tmp_path / "index.npy")
    rows = (tmp_path / "index.csv").read_text().splitlines()
    assert rows[0] == "row,source" and [r.split(",")[1] for r in rows[1:]] == [str(folder / f"{n}.jpg") for n in range(5)]
    np.testing.assert_allclose(vectors, more_scale.load(export).embed_cxr(images), atol=1e-6)
    skipped = (tmp_path / "index.skipped.csv").read_text()
    assert "broken.jpg" in skipped and "not a readable image" in skipped
    capsys.readouterr()
    assert retrieve_main(["--model", str(export), "--index", str(tmp_path / "index"), "--query", "Cardiomegaly.",
                          "--top", "3"]) == 0
    listed = re.findall(r"^\s+(\d)\. ([+-]\d\.\d{3})  (\S+)$", capsys.readouterr().out, re.M)
    assert [int(r) for r, _, _ in listed] == [1, 2, 3]
    scores = [float(s) for _, s, _ in listed]
    assert scores == sorted(scores, reverse=True)
    assert retrieve_main(["--model", str(export), "--index", str(tmp_path / "index"), "--zero-shot"]) == 0
    table = list(csv.DictReader(open(tmp_path / "index.zero_shot.csv")))
    expected = more_scale.load(export).zero_shot(vectors, "cxr")["Cardiomegaly"]
    assert [r["source"] for r in table] == [str(folder / f"{n}.jpg") for n in range(5)]
    np.testing.assert_allclose([float(r["Cardiomegaly"]) for r in table], expected["positive"] - expected["negative"],
                               atol=1e-4)


def test_more_embed_reads_a_csv_manifest_of_npy_ecgs(trained, raw_root, tmp_path, capsys):
    """The build's CSV manifest as input: .npy ECGs at the row's ecg_rate embed as the API embeds the same
    signals; a row whose file is not an ECG is skipped and named; a row without an ECG is not listed."""
    from launch_helpers import embed_main

    import more_scale
    from more_scale.data.ecg import read_wfdb

    _, export = trained
    records = [read_wfdb(h) for h in sorted(raw_root.rglob("*.hea"))[:3]]
    lines = ["key,ecg,ecg_rate,ecg_text"]
    for n, (signal, rate) in enumerate(records):
        np.save(tmp_path / f"{n}.npy", signal.T)  # (T, 12), as PTB-XL derived files store it
        lines.append(f"s{n},{n}.npy,{rate:g},Sinus rhythm.")
    np.save(tmp_path / "flat.npy", np.zeros(7))
    lines += ["bad,flat.npy,500,Sinus rhythm.", "textonly,,,Sinus rhythm."]
    (tmp_path / "samples.csv").write_text("\n".join(lines) + "\n")
    assert embed_main(["--model", str(export), "--manifest", str(tmp_path / "samples.csv"), "--modality", "ecg",
                       "--out", str(tmp_path / "ecgs")]) == 0
    rows = (tmp_path / "ecgs.csv").read_text().splitlines()
    assert [r.split(",")[1].split()[0] for r in rows[1:]] == ["s0", "s1", "s2"]
    np.testing.assert_allclose(np.load(tmp_path / "ecgs.npy"), more_scale.load(export).embed_ecg(records), atol=1e-5)
    skipped = (tmp_path / "ecgs.skipped.csv").read_text()
    assert "flat.npy" in skipped and "expected (T, 12) or (12, T)" in skipped


def test_more_embed_reads_a_built_split(trained, shards, tmp_path, capsys):
    """--shards: every sample's X-ray and report vectors equal evaluation's embedding of that split, listed
    by "key position"; a split built with another short side is refused, naming the option, before any work."""
    from launch_helpers import embed_main

    import more_scale
    from more_scale.config import load_config
    from more_scale.eval.embed import embed

    run, export = trained
    model = more_scale.load(export)
    cfg = load_config(run / "config.yaml")
    emb = embed(model.model, shards / "test", cfg.data, input_shape(cfg.model), model.tokenizer)
    for modality in ("cxr", "text"):
        assert embed_main(["--model", str(export), "--shards", str(shards / "test"), "--modality", modality,
                           "--out", str(tmp_path / modality), "--batch-size", "5"]) == 0
        np.testing.assert_allclose(np.load(tmp_path / f"{modality}.npy"), emb.vectors[modality], atol=1e-5)
        rows = (tmp_path / f"{modality}.csv").read_text().splitlines()[1:]
        assert [r.split(",")[1] for r in rows] == [f"{k} {i}" for i, k in enumerate(emb.keys)]
    other = tmp_path / "other"
    shutil.copytree(shards / "test", other)
    index = json.loads((other / "shards.json").read_text())
    index["build"]["short_side"] = int(index["build"]["short_side"]) * 2
    (other / "shards.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=r"built with short_side \d+ \(the model's shards: \d+\)"):
        embed_main(["--model", str(export), "--shards", str(other), "--out", str(tmp_path / "x")])


def test_chexpert_csv_builds_and_evaluates_zero_shot_with_the_uncertain_policy(trained, raw_root, tmp_path, capsys):
    """Stanford CheXpert's layout (Path, Frontal/Lateral, observations as 1 / 0 / -1 / blank) built with
    --source chexpert: frontal images only, labels as written with -1 kept (ignore) or read as 1 (positive),
    blank left out; image-only samples pass evaluation's loader, are scored zero-shot by the reference's
    protocol (a -1 never a target), and get no text retrieval. A cell that is none of the four is refused by
    row and column."""
    from launch_helpers import build_shards_main, evaluate_main

    from more_scale.eval.tasks import load_tasks

    images = sorted(raw_root.rglob("*.jpg"))[:8]
    folder = tmp_path / "CheXpert-v1.0-small"
    cardiomegaly = [1, 0, -1, None, 1, 0, 1, 0]
    lines = ["Path,Sex,Age,Frontal/Lateral,AP/PA,Cardiomegaly,Edema,Pleural Effusion,Atelectasis"]
    for n, (image, label) in enumerate(zip(images, cardiomegaly)):
        relative = f"CheXpert-v1.0-small/valid/patient{n:05d}/study1/view1_frontal.jpg"
        (tmp_path / relative).parent.mkdir(parents=True)
        shutil.copy(image, tmp_path / relative)
        cell = "" if label is None else f"{label:.1f}"
        lines.append(f"{relative},Female,60,Frontal,AP,{cell},{(n % 2):.1f},0.0,{1.0 if n < 4 else 0.0}")
    lines.append("CheXpert-v1.0-small/valid/patient00000/study1/view2_lateral.jpg,Female,60,Lateral,,1.0,,,")
    (folder / "valid.csv").write_text("\n".join(lines) + "\n")
    for policy in ("ignore", "positive"):
        assert build_shards_main(["--source", "chexpert", "--manifest", str(folder / "valid.csv"), "--out",
                                  str(tmp_path / policy), "--uncertain", policy, "--tokenizer-vocab", "0",
                                  "--short-side", "72"]) == 0
    index = json.loads((tmp_path / "ignore" / "test" / "shards.json").read_text())
    assert index["samples"] == 8 and index["build"]["uncertain"] == "ignore"  # the lateral image left out

    run, _ = trained
    for policy, uncertain_as in (("ignore", -1.0), ("positive", 1.0)):  # ignore keeps -1: never a target
        out = tmp_path / f"eval_{policy}"
        assert evaluate_main(["--checkpoint", str(run), "--shards", str(tmp_path / policy / "test"), "--out",
                              str(out), "--tasks", "reference"]) == 0
        results = json.loads((out / "results.json").read_text())
        task = next(t for t in load_tasks("reference") if t.name == "Cardiomegaly")
        expected = [task.label({"chexpert": {} if v is None else {"Cardiomegaly": uncertain_as if v == -1 else v}})
                    for v in cardiomegaly]
        assert results["zero_shot"]["Cardiomegaly"]["n"] == sum(v is not None for v in expected)
        assert results["zero_shot"]["Cardiomegaly"]["n_positive"] == sum(v == 1.0 for v in expected)
        assert results["retrieval"]["text->cxr"] == {"n": 0}
        assert (out / "report.html").is_file() and "Retrieval" not in results["figures"]  # no report to query with
    (folder / "valid.csv").write_text("\n".join(lines[:2] + [lines[2].replace(",0.0,1.0,", ",0.0,yes,")]) + "\n")
    with pytest.raises(SystemExit):
        build_shards_main(["--source", "chexpert", "--manifest", str(folder / "valid.csv"), "--out", str(tmp_path / "x")])
    assert "row 3, column 'Edema': 'yes', expected 1, 0, -1 or blank" in capsys.readouterr().err
