"""Use a trained MoRE: chest X-rays, 12-lead ECGs and report text into one embedding space, each prepared
exactly as training prepared it (the InputFormat recorded beside the weights).

    import more_scale
    model = more_scale.load("demo/export")                 # an export (more-export) or a run folder
    images = model.embed_cxr(["p10/s5000/view1.jpg"])       # (1, D) float32, unit norm
    reports = model.embed_text(["Cardiomegaly.", "Normal heart size."])
    print(images @ reports.T)                               # cosine similarities

The model is in eval mode with gradients off; inputs are embedded in batches on the chosen device.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from more_scale.data import cxr, ecg
from more_scale.data.input_format import InputFormat, InputsUnknown
from more_scale.eval.embed import embed_texts, load_trained

INPUTS_FILE = "inputs.json"  # a run folder's InputFormat, written by training
REPORT_SIDES = ("radiology", "cardiology")


class MoREEmbedder:
    """A trained MoRE with its tokenizer and input format; see the module docstring."""

    def __init__(self, model, tokenizer, inputs: InputFormat, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.float().eval().requires_grad_(False).to(self.device)
        self.tokenizer, self.inputs = tokenizer, inputs

    @torch.no_grad()
    def embed_cxr(self, images: Iterable[str | Path | np.ndarray], batch_size: int = 32) -> np.ndarray:
        """X-ray files (JPEG, PNG; 8/16-bit, gray or colour) or (H, W) uint8 grayscale arrays as read from
        such files -> (N, D) unit-norm float32, through the shards' preprocessing and evaluation's crop."""
        return self._batched("cxr", [self._cxr_input(image) for image in images], batch_size)

    @torch.no_grad()
    def embed_ecg(self, records: Iterable[str | Path | tuple[np.ndarray, float]], batch_size: int = 64) -> np.ndarray:
        """WFDB records (path without extension, or the .hea) or (signal, rate_hz) pairs, signal (12, T) in mV
        in `inputs.leads` order -> (N, D) unit-norm float32."""
        return self._batched("ecg", [self._ecg_input(record) for record in records], batch_size)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str], report: str = "radiology", batch_size: int = 64) -> np.ndarray:
        """Report text -> (N, D) unit-norm float32. `report`: which report the text stands for (radiology:
        compare with X-rays, cardiology: with ECGs), framed as the text tower saw reports in training."""
        if report not in REPORT_SIDES:
            raise ValueError(f"report={report!r}, expected one of {REPORT_SIDES}")
        pairs = [(t, "") if report == "radiology" else ("", t) for t in texts]
        if not pairs:
            raise ValueError("embed_text: no texts given")
        fmt = self.inputs
        return np.concatenate([embed_texts(self.model, self.tokenizer, pairs[start:start + batch_size],
                                           fmt.text_pairing, fmt.max_text_tokens) for start in range(0, len(pairs), batch_size)])

    def zero_shot(self, embeddings: np.ndarray, modality: str, tasks_file: str | Path | None = None) -> dict:
        """Per task of a tasks YAML (default: the shipped one) for `modality` (cxr | ecg): each answer's
        similarity to every embedding, {task: {answer: (N,) float32}}; binary tasks also carry "score", the
        zero-shot score evaluation ranks by (the task's score rule: positive minus negative centroid, or max)."""
        from more_scale.eval.metrics import answer_centroids, binary_scores
        from more_scale.eval.tasks import load_tasks

        report = "radiology" if modality == "cxr" else "cardiology"
        scores = {}
        for task in (t for t in load_tasks(tasks_file) if t.modality == modality):
            prompts = {a: self.embed_text(list(task.answers[a]), report) for a in task.answers}
            scores[task.name] = {a: embeddings @ c for a, c in answer_centroids(prompts).items()}
            if task.kind == "binary":
                scores[task.name]["score"] = binary_scores(embeddings, task, prompts)
        return scores

    def _batched(self, modality: str, inputs: list[np.ndarray], batch_size: int) -> np.ndarray:
        parts = []
        for start in range(0, len(inputs), batch_size):
            x = torch.from_numpy(np.stack(inputs[start:start + batch_size])).to(self.device)
            parts.append(self.model.encode(modality, x).cpu().numpy())
        if not parts:
            raise ValueError(f"embed_{modality}: no inputs given")
        return np.concatenate(parts)

    def _cxr_input(self, image) -> np.ndarray:
        fmt = self.inputs
        gray = image if isinstance(image, np.ndarray) else cxr.read_gray(image)
        if gray.ndim != 2 or gray.dtype != np.uint8:
            raise ValueError(f"an X-ray array must be (H, W) uint8 grayscale, got {gray.shape} {gray.dtype}")
        jpeg = cxr.stored_jpeg(gray, fmt.cxr_short_side, fmt.cxr_squash)  # what the shard holds
        return cxr.to_model_input(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE), fmt.image_size)

    def _ecg_input(self, record) -> np.ndarray:
        fmt = self.inputs
        if isinstance(record, tuple):
            signal, rate = record
            stored, _ = ecg.preprocess_signal(np.asarray(signal, np.float64), float(rate), fmt.ecg_rate_hz, "array")
        else:
            stored, _ = ecg.preprocess_record(record, fmt.ecg_rate_hz)
        return ecg.to_model_input(stored.astype(np.float32), fmt.ecg_samples)


def write_run_inputs(cfg, out: Path) -> None:
    """Training's record of its input format in the run folder (from the first training source's shards.json:
    one run's sources are built alike)."""
    from more_scale.data.build import read_index
    from more_scale.data.pipeline import source_dirs

    build = read_index(source_dirs(cfg.data.train)[0])["build"]
    (out / INPUTS_FILE).write_text(json.dumps(InputFormat.of_training(build, cfg).to_dict(), indent=1))


def run_inputs(run_dir: Path) -> InputFormat | None:
    """A run folder's input format (None for a run trained before it was recorded)."""
    where = Path(run_dir) / INPUTS_FILE
    return InputFormat.from_dict(json.loads(where.read_text()), where) if where.is_file() else None


def load(path: str | Path, device: str | torch.device = "cpu") -> MoREEmbedder:
    """An export directory (config.json + model.safetensors) or a training run folder (its latest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        from more_scale.export import from_pretrained

        model, _, tokenizer = from_pretrained(path)
        recorded = json.loads((path / "config.json").read_text()).get("inputs")
        where = path / "config.json"
    elif (path / "config.yaml").is_file():
        model, _, tokenizer = load_trained(path)
        recorded, where = run_inputs(path), path / INPUTS_FILE
    else:
        raise FileNotFoundError(f"{path}: neither an export (config.json + model.safetensors) nor a run folder "
                                "(config.yaml + checkpoints/)")
    if not recorded:
        raise InputsUnknown(f"{where}: the input format (X-ray short side, ECG rate, ...) was not recorded; "
                            "re-export with this version (more-export) or train with it")
    inputs = recorded if isinstance(recorded, InputFormat) else InputFormat.from_dict(recorded, where)
    return MoREEmbedder(model, tokenizer, inputs, device)
