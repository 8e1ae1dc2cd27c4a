"""The evaluation protocols: each metric against scikit-learn / scipy or a hand-computed value on fixed toy
embeddings; the tasks YAML; prompts that are not the synthetic generator's sentences; relevance maps."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from more_scale.data import synthetic
from more_scale.eval.embed import Embeddings
from more_scale.eval.metrics import expected_ranks, linear_probe, retrieval, unit, zero_shot
from more_scale.eval.tasks import Task, expand, load_tasks


def _embeddings(n: int, meta: list[dict], seed: int = 0, d: int = 8) -> Embeddings:
    rng = np.random.default_rng(seed)
    vectors = {m: unit(rng.normal(size=(n, d))) for m in ("cxr", "ecg", "text")}
    masks = {m: np.ones(n, bool) for m in ("cxr", "ecg", "text")}
    return Embeddings(vectors, masks, [f"k{i}" for i in range(n)], meta)


def _prompts(answers, seed=1, d=8):
    rng = np.random.default_rng(seed)
    return {a: unit(rng.normal(size=(3, d))) for a in answers}


def test_binary_zero_shot_equals_sklearn():
    labels = [1.0, 0.0, 1.0, None, 0.0, 0.0, 1.0, -1.0, 0.0, 1.0]
    meta = [{"chexpert": {"Edema": v}} if v is not None else {} for v in labels]
    task = Task("Edema", "cxr", "binary", {"field": "chexpert.Edema", "positive": [1.0], "negative": [0.0]},
                {"positive": ("a",), "negative": ("b",)})
    emb, prompts = _embeddings(10, meta), _prompts(("positive", "negative"))
    r = zero_shot(emb, task, prompts)
    rows = [i for i, v in enumerate(labels) if v in (0.0, 1.0)]  # blank (ignored here) and uncertain -1 left out
    x = emb.vectors["cxr"][rows]
    score = x @ unit(prompts["positive"].mean(0)) - x @ unit(prompts["negative"].mean(0))
    y = np.array([labels[i] for i in rows])
    assert r["n"] == 8 and r["n_positive"] == 4
    assert r["auroc"] == pytest.approx(roc_auc_score(y, score)) and r["auprc"] == pytest.approx(average_precision_score(y, score))
    assert r["chance_auprc"] == pytest.approx(0.5) and abs(r["chance_auroc"] - 0.5) < 0.1


def test_the_references_max_of_sampled_prompts_scoring():
    """`--tasks reference`: GLoRIA's prompt lists, 5 drawn per class with a fixed seed (the same 5 on every
    load, all from the full expansion), and each image scored by its highest cosine among them; AUROC of that
    score equals scikit-learn's. A malformed score rule is refused naming the field."""
    from more_scale.eval.tasks import TasksError, _task

    tasks = {t.name: t for t in load_tasks("reference")}
    assert set(tasks) == {"Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"}
    spec = {"kind": "binary", "labels": {"field": "chexpert.Edema"}, "negative": ["No edema."],
            "positive": {"template": "{severity} {subtype}", "severity": ["", "mild", "improvement in", "presistent",
                                                                          "moderate", "decreased"],
                         "subtype": ["pulmonary edema", "trace interstitial edema", "pulmonary interstitial edema"]}}
    full = _task("Edema", "cxr", spec).answers["positive"]
    assert len(full) == 18 and len(tasks["Edema"].answers["positive"]) == 5
    assert set(tasks["Edema"].answers["positive"]) <= set(full)
    assert [t.answers for t in load_tasks("reference")] == [t.answers for t in tasks.values()]  # seeded
    assert all(t.score == "max" for t in tasks.values())

    labels = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    emb = _embeddings(10, [{"chexpert": {"Edema": v}} for v in labels])
    prompts = _prompts(("positive", "negative"))
    r = zero_shot(emb, tasks["Edema"], prompts)
    by_hand = np.max(emb.vectors["cxr"] @ prompts["positive"].T, axis=1)
    assert r["auroc"] == pytest.approx(roc_auc_score(labels, by_hand))
    centroid = zero_shot(emb, Task("Edema", "cxr", "binary", tasks["Edema"].labels, tasks["Edema"].answers), prompts)
    assert centroid["auroc"] != pytest.approx(r["auroc"])  # the two rules rank these differently
    for rule, message in (({"method": "mean"}, "score.method 'mean'"), ({"sample": 99}, "score.sample must be"),
                          ("max", "score must be a mapping")):
        with pytest.raises(TasksError, match=message):
            _task("Edema", "cxr", {**spec, "score": rule})


def test_multilabel_macro_and_single_label_by_priority():
    classes = {"NORM": ("n",), "MI": ("m",), "STTC": ("s",)}
    sets = [{"NORM"}, {"MI", "STTC"}, {"STTC"}, {"NORM"}, {"MI"}, {"STTC", "NORM"}]
    meta = [{"superclass": sorted(s)} for s in sets]
    task = Task("PTB-XL", "ecg", "multilabel", {"field": "superclass"}, classes, ("MI", "STTC", "NORM"))
    emb, prompts = _embeddings(6, meta), _prompts(classes)
    r = zero_shot(emb, task, prompts)
    sims = emb.vectors["ecg"] @ np.stack([unit(prompts[c].mean(0)) for c in classes]).T
    expected = []
    for j, c in enumerate(classes):
        y = [c in s for s in sets]
        others = (sims.sum(1) - sims[:, j]) / 2
        expected.append(roc_auc_score(y, sims[:, j] - others))
        assert r["classes"][c]["auroc"] == pytest.approx(expected[-1])
    assert r["macro_auroc"] == pytest.approx(np.mean(expected))
    truth = ["NORM", "MI", "STTC", "NORM", "MI", "STTC"]  # MI first, then STTC, then NORM
    predicted = [list(classes)[k] for k in sims.argmax(1)]
    assert r["single_label"]["accuracy"] == pytest.approx(np.mean([a == b for a, b in zip(predicted, truth)]))
    # scored as the reference scores it: one-vs-rest AUROC of each class's similarity, by hand, then the mean
    by_hand = [roc_auc_score([t == c for t in truth], sims[:, j]) for j, c in enumerate(classes)]
    assert r["single_label"]["macro_auroc"] == pytest.approx(np.mean(by_hand))


def test_ptbxl_single_label_order_is_the_references():
    """zero_shot_ecg_more.py 19-29 assigns NORM, then STTC, MI, HYP, CD (the first one a record carries)."""
    task = next(t for t in load_tasks() if t.name == "PTB-XL superclass")
    assert task.priority == ("NORM", "STTC", "MI", "HYP", "CD")


def test_ordinal_spearman_of_the_expected_level():
    grades = [0, 1, 2, 3, 0, 2, 3, 1]
    task = Task("Edema severity", "cxr", "ordinal", {"field": "edema_severity"}, {str(g): ("x",) for g in range(4)})
    emb, prompts = _embeddings(8, [{"edema_severity": g} for g in grades]), _prompts([str(g) for g in range(4)])
    r = zero_shot(emb, task, prompts, scale=10.0)
    sims = emb.vectors["cxr"] @ np.stack([unit(prompts[str(g)].mean(0)) for g in range(4)]).T
    probs = np.exp(10 * (sims - sims.max(1, keepdims=True)))
    probs /= probs.sum(1, keepdims=True)
    assert r["spearman"] == pytest.approx(spearmanr(grades, probs @ np.arange(4)).statistic)
    assert r["accuracy"] == pytest.approx(np.mean(sims.argmax(1) == np.array(grades)))


def test_median_rank_by_hand():
    sims = np.array([[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.3, 0.3, 0.3]])  # ranks 1, 2, and 2 (all three tied)
    assert expected_ranks(sims).tolist() == [1.0, 2.0, 2.0]
    emb = Embeddings({"text": unit(np.eye(3)), "cxr": unit(np.eye(3))}, {"text": np.ones(3, bool), "cxr": np.ones(3, bool)},
                     ["a", "b", "c"], [{}] * 3)
    r = retrieval(emb, "text", "cxr")
    assert r["median_rank"] == 1.0 and r["R@1"] == 1.0 and r["chance_median_rank"] == 2.0


def test_linear_probe_at_full_labels_equals_sklearn():
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 2, 40).astype(float), rng.integers(0, 2, 20).astype(float)
    train = _embeddings(40, [{"chexpert": {"Edema": v}} for v in y_train], seed=2)
    test = _embeddings(20, [{"chexpert": {"Edema": v}} for v in y_test], seed=3)
    train.vectors["cxr"] += 0.3 * y_train[:, None]  # something to learn
    task = Task("Edema", "cxr", "binary", {"field": "chexpert.Edema"}, {"positive": ("a",), "negative": ("b",)})
    r = linear_probe(train, test, task)
    model = LogisticRegression(max_iter=2000, class_weight="balanced").fit(train.vectors["cxr"], y_train)
    assert r["auroc@1"] == pytest.approx(roc_auc_score(y_test, model.decision_function(test.vectors["cxr"])))
    assert {"auroc@0.01", "auroc@0.1"} <= set(r) and r["n_train"] == 40


def test_multilabel_linear_probe_is_sklearns_macro_auroc():
    """PTB-XL-superclass-like labels (several classes per sample): at 100% of the labels the probe's figure is
    the mean over classes of each class's own balanced logistic regression's test AUROC, as scikit-learn gives it."""
    rng = np.random.default_rng(0)
    classes = ("NORM", "MI", "STTC")
    y_train, y_test = rng.random((60, 3)) < 0.4, rng.random((30, 3)) < 0.4
    for y in (y_train, y_test):
        y[~y.any(1), 0] = True  # a sample without any class is unlabelled, not a negative for all
    y_test[0], y_test[1] = True, [False, True, False]  # every class has both outcomes in the test split

    def meta(rows):
        return [{"superclasses": [c for c, held in zip(classes, row) if held]} for row in rows]

    train, test = _embeddings(60, meta(y_train), seed=2), _embeddings(30, meta(y_test), seed=3)
    train.vectors["ecg"][:, :3] += 0.5 * y_train  # something to learn, a direction per class
    test.vectors["ecg"][:, :3] += 0.5 * y_test
    task = Task("superclass", "ecg", "multilabel", {"field": "superclasses"}, {c: (c,) for c in classes})
    r = linear_probe(train, test, task)
    expected = np.mean([roc_auc_score(y_test[:, c], LogisticRegression(max_iter=2000, class_weight="balanced")
                                      .fit(train.vectors["ecg"], y_train[:, c]).decision_function(test.vectors["ecg"]))
                        for c in range(3)])
    assert r["auroc@1"] == pytest.approx(expected) and r["classes"] == 3 and r["n_train"] == 60
    assert 0.5 < r["auroc@0.1"] <= 1 and 0 < r["auroc@0.01"] <= 1


def test_tasks_yaml_labels_and_templates():
    tasks = {t.name: t for t in load_tasks()}
    assert {"Atelectasis", "Cardiomegaly", "Edema", "Pleural Effusion"} <= set(tasks)
    assert expand({"template": "{a} {b}.", "a": ["", "Mild"], "b": ["edema"]}) == ("Edema.", "Mild edema.")
    cardio = tasks["Cardiomegaly"]
    assert cardio.label({"chexpert": {"Cardiomegaly": 1.0}}) == 1.0 and cardio.label({"chexpert": {}}) == 0.0
    assert cardio.label({"chexpert": {"Cardiomegaly": -1.0}}) is None  # uncertain: never a target
    assert cardio.label({"finding": "COVID-19"}) is None  # no CheXpert table at all: unknown, not negative
    assert tasks["Atrial fibrillation"].label({"ecg_statements": ["Atrial fibrillation with RVR"]}) == 1.0
    ptbxl = tasks["PTB-XL superclass"]
    assert ptbxl.label({"superclass": ["MI", "STTC"]}) == {"MI", "STTC"} and ptbxl.label({"finding": "x"}) is None
    assert tasks["Edema severity"].label({"edema_severity": 3}) == 3
    assert cardio.prompts("positive")[0] == (cardio.answers["positive"][0], "")  # the radiology side


def test_prompts_are_not_the_synthetic_generators_sentences():
    written = {s for table in (synthetic.HEART, synthetic.FLUID, synthetic.LUNGS, synthetic.COLLAPSE)
               for options in table.values() for s in options}
    written |= {line for rhythm in ("sinus", "brady", "tachy", "afib") for lvh in (False, True)
                for line in synthetic.ecg_statements(np.random.default_rng(0), synthetic.EcgFindings(rhythm, lvh))}
    prompts = {p.rstrip(".").lower() for t in load_tasks() for a in t.answers.values() for p in a}
    assert not prompts & {w.rstrip(".").lower() for w in written}


def test_relevance_peaks_on_the_patch_the_answer_depends_on():
    """A tiny ViT trained to read one patch's brightness: its relevance map points at that patch."""
    from more_scale.config import CxrConfig
    from more_scale.eval.explain import SANITY_MAX_RANK_CORRELATION, randomised, rank_correlations, token_relevance
    from more_scale.models.vit import build_cxr_encoder

    torch.manual_seed(0)
    vit = build_cxr_encoder(CxrConfig(width=32, depth=2, heads=2, image_size=32, patch_size=8, attention="math"))
    readout = torch.nn.Linear(32, 1)
    target = 6  # row 1, column 2 of the 4 x 4 patch grid
    optimiser = torch.optim.Adam([*vit.parameters(), *readout.parameters()], lr=3e-3)
    for _ in range(400):
        x = torch.randn(32, 1, 32, 32)
        y = 8 * x[:, 0, 8:16, 16:24].mean((1, 2))  # the target patch's mean, scaled to unit variance
        loss = ((readout(vit(x))[:, 0] - y) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.1  # it learned to read that patch (the target's variance is 1)
    x = torch.randn(8, 1, 32, 32)
    x[:, 0, 8:16, 16:24] += 2.0  # a bright patch: a large answer to explain
    relevance, _ = token_relevance(vit, x, lambda f: readout(f)[:, 0])
    assert (relevance.argmax(1) == target).float().mean() >= 0.75
    # the randomisation check: the untrained twin's map does not point there, and the two maps disagree
    twin, twin_readout = randomised(vit), randomised(readout)
    assert not any(torch.equal(a, b) for a, b in zip(twin.parameters(), vit.parameters()))
    untrained, _ = token_relevance(twin, x, lambda f: twin_readout(f)[:, 0])
    assert (untrained.argmax(1) == target).float().mean() < 0.5
    rho = rank_correlations(relevance.numpy(), untrained.numpy())
    assert max(rho) < SANITY_MAX_RANK_CORRELATION
    assert rank_correlations(relevance.numpy(), relevance.numpy()) == pytest.approx([1.0] * len(x))  # itself: fails


def test_ecg_attribution_names_the_lead_the_answer_depends_on():
    """A tiny ECG tower (the paper's Conv1d stem, which mixes the leads) trained to read lead aVL alone: the
    per-lead gradient x input gives aVL the largest share on every sample, while the leads' maps differ."""
    from more_scale.config import EcgConfig
    from more_scale.data.ecg import LEADS
    from more_scale.eval.explain import ecg_maps
    from more_scale.models.vit import build_ecg_encoder

    torch.manual_seed(0)
    vit = build_ecg_encoder(EcgConfig(width=32, depth=2, heads=2, samples=200, stem_channels=16, stem_norm="group",
                                      attention="math"))
    readout = torch.nn.Linear(32, 1)
    lead = LEADS.index("aVL")
    optimiser = torch.optim.Adam([*vit.parameters(), *readout.parameters()], lr=3e-3)
    for _ in range(300):
        x = torch.randn(32, 12, 200)
        y = x[:, lead, 50:150].mean(1) * 10  # a window of one lead, scaled to unit variance
        loss = ((readout(vit(x))[:, 0] - y) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.2  # it learned to read that lead (the target's variance is 1)
    per_lead, over_time = ecg_maps(vit, torch.randn(8, 12, 200), lambda f: readout(f)[:, 0], rate=100.0)
    share = per_lead.sum(-1) / per_lead.sum((1, 2))[:, None]
    assert (share.argmax(1) == lead).all() and share[:, lead].mean() > 0.3  # 12 equal leads would be 0.083 each
    assert over_time.shape == (8, 200)


def test_reference_recipe_pieces(tokenizer, tmp_path):
    """The MoRE reference's choices, each a switch: its head, its pair tokenisation, its squash-then-CLAHE
    preprocessing and its warm restarts."""
    import cv2

    from more_scale.config import DataConfig, InputShape, TrainConfig
    from more_scale.data import cxr
    from more_scale.data.pipeline import SkipCounter, collate
    from more_scale.models.more import projection_head
    from more_scale.train.engine import warmup_cosine

    head = projection_head(16, 16, 8, "reference")
    assert all(m.bias is None for m in head if isinstance(m, torch.nn.Linear))
    assert isinstance(head[-1], torch.nn.BatchNorm1d) and head.eval()(torch.randn(4, 16)).shape == (4, 8)

    sample = {"key": "k", "cxr": None, "ecg": np.zeros((12, 100), np.float32), "meta": {},
              "reports": ("The lungs are clear. " * 40, "Atrial fibrillation.")}
    decoded = {}
    for pairing in ("joined", "pair"):
        cfg = DataConfig(max_text_tokens=48, text_pairing=pairing)
        batch = collate([sample], tokenizer, cfg, InputShape(32, 100), SkipCounter())
        assert batch.input_ids.shape[1] <= 48
        decoded[pairing] = tokenizer.decode(batch.input_ids[0], skip_special_tokens=True)
    assert "fibrillation" not in decoded["joined"] and "fibrillation" in decoded["pair"]

    image = np.random.default_rng(0).integers(0, 255, (90, 60), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), image)
    squashed = cxr.preprocess_image(cxr.read_gray(tmp_path / "x.png"), squash=32)
    assert squashed.shape == (32, 32)
    assert np.array_equal(squashed, cxr.clahe(cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA)))

    restarts = TrainConfig(steps=100, warmup_steps=10, schedule="cosine_restarts", restart_steps=30)
    assert [warmup_cosine(s, restarts) for s in (10, 40, 70)] == [1.0, 1.0, 1.0]
    assert warmup_cosine(25, restarts) == pytest.approx(0.5)  # half way through a period


@pytest.mark.parametrize("n_pos, n_neg", [(30, 120), (300, 1200)])
def test_bootstrap_auroc_interval_matches_delongs_standard_error(n_pos, n_neg):
    """The stratified bootstrap's 95% interval holds the point estimate and is as wide as the normal interval
    from DeLong's (1988) nonparametric variance, 3.92 standard errors, within 15% (both estimate the same
    variance; the percentile interval's own noise at 1000 draws is ~5%, its skew at AUROC 0.8 a few %)."""
    from more_scale.eval.metrics import binary_metrics

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    scores = y * 1.0 + rng.normal(size=len(y))
    r = binary_metrics(y, scores)
    pos, neg = scores[:n_pos, None], scores[None, n_pos:]
    psi = (pos > neg) + 0.5 * (pos == neg)  # (n_pos, n_neg) pairwise wins
    se = np.sqrt(psi.mean(1).var(ddof=1) / n_pos + psi.mean(0).var(ddof=1) / n_neg)
    lo, hi = r["auroc_ci"]
    assert lo < r["auroc"] < hi and (hi - lo) == pytest.approx(3.92 * se, rel=0.15)
    assert r["auprc_ci"][0] < r["auprc"] < r["auprc_ci"][1]


def test_results_below_chance_are_flagged():
    from more_scale.eval.evaluate import verdict

    assert verdict({"auroc_ci": [0.10, 0.30], "chance_auroc": 0.5}) == "BELOW CHANCE"
    assert verdict({"auroc_ci": [0.40, 0.60], "chance_auroc": 0.5}) == "at chance"
    assert verdict({"auroc_ci": [0.70, 0.90], "chance_auroc": 0.5}) == "above chance"
    from more_scale.eval.metrics import binary_metrics

    one_positive = binary_metrics(np.r_[1.0, np.zeros(30)], np.linspace(1, 0, 31))  # a resample repeats it
    assert one_positive["auroc_ci"] is None and verdict(one_positive).startswith("too few to judge")


def test_the_retrieval_grid_frames_each_reports_own_xray(tmp_path):
    """Each row ends with the report's own X-ray framed in green (#1a7f37), whatever its rank: the picture shows
    the green frame once per query even when no own X-ray reaches the top 5 (random embeddings here)."""
    import cv2

    from more_scale.eval.figures import retrieval_grid

    rng = np.random.default_rng(0)
    n = 40
    emb = Embeddings({m: unit(rng.normal(size=(n, 8))) for m in ("cxr", "ecg", "text")},
                     {m: np.ones(n, bool) for m in ("cxr", "ecg", "text")}, [str(i) for i in range(n)],
                     [{} for _ in range(n)], [f"The report from Xray is: finding number {i}." for i in range(n)],
                     rng.integers(0, 255, (n, 64, 64)).astype(np.uint8))
    image = cv2.imread(str(retrieval_grid(emb, tmp_path / "grid.png", queries=3)))
    green = np.all(np.abs(image.astype(int) - (55, 127, 26)) <= 12, axis=-1)  # BGR of #1a7f37
    _, labels = cv2.connectedComponents(green.astype(np.uint8))
    frames = [k for k in range(1, labels.max() + 1) if (labels == k).sum() > 400]  # drawn frames, not title text
    assert len(frames) >= 3, len(frames)
