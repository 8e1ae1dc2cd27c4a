"""Load a trained run and embed a shard set: what zero-shot, retrieval and probes stand on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from more_scale import dist
from more_scale.config import Config, DataConfig, InputShape, load_config
from more_scale.data.pipeline import iter_batches
from more_scale.data.reports import tokenize_reports
from more_scale.data.tokenizer import load_tokenizer
from more_scale.models.more import MODALITIES, MoRE, build_model
from more_scale.train.checkpoint import (
    checked_tag,
    checkpoint_root,
    client_state,
    data_only_loads,
    frozen_base,
    latest_tag,
)
from more_scale.train.universal import fp32_weights

THUMBNAIL = 64  # px: X-ray thumbnails kept for retrieval grids


@dataclass
class Embeddings:
    vectors: dict[str, np.ndarray]  # modality -> (N, D) unit-norm
    masks: dict[str, np.ndarray]  # modality -> (N,) bool: present in the sample
    keys: list[str]
    meta: list[dict]
    texts: list[str] = field(default_factory=list)  # the joined report of each sample (as tokenised, decoded)
    thumbnails: np.ndarray | None = None  # (N, THUMBNAIL, THUMBNAIL) uint8 X-ray thumbnails (zeros: none)
    positions: list[int] = field(default_factory=list)  # each sample's running index in its shard set


def load_trained(run_dir: str | Path, tag: str | None = None) -> tuple[MoRE, Config, object]:
    """(model in eval mode, fp32; the run's config; its tokenizer) from a run folder's checkpoint.
    Works for any ZeRO stage and world size (universal.fp32_weights merges the rank shards). The frozen
    text base is not in the checkpoint: it is rebuilt as training built it (its local path, or the seeded
    random init) and must match the fingerprint the checkpoint recorded."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    torch.manual_seed(cfg.train.seed)  # as training did before building the model: the same random base
    model = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id)
    tag = checked_tag(run_dir, tag) if tag else latest_tag(run_dir)
    tag_dir = checkpoint_root(run_dir) / tag
    with data_only_loads(tag_dir):  # a run folder from someone else is data: loading it never runs code
        state = fp32_weights(tag_dir)
        client = client_state(tag_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen - _buffers_of(model):
        raise ValueError(f"{run_dir}: checkpoint does not match the config's model "
                         f"(missing {sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]})")
    saved = client.get("frozen_base")
    if saved and saved["sha256"] != frozen_base(model, cfg.model.text.pretrained)["sha256"]:
        raise ValueError(f"{run_dir}: the frozen text base rebuilt from {cfg.model.text.pretrained or 'its seeded random init'} "
                         "is not the one the checkpoint was trained with (fingerprints differ)")
    return model.float().eval(), cfg, tokenizer


def _buffers_of(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_buffers()}


@torch.no_grad()
def embed(model: MoRE, shards: str | Path, data_cfg: DataConfig, shape: InputShape, tokenizer,
          batch_size: int = 64) -> Embeddings:
    """Every sample of a shard set through the model, on the device the model is on. Launched distributed,
    rank r embeds the batches r, r + world, ... (each the batch one process would build) and every rank gets
    the whole set back in index order."""
    device = next(model.parameters()).device
    rank, world = dist.rank(), dist.world_size()
    parts = []
    batches = iter_batches(shards, data_cfg, shape, tokenizer, batch_size, part=(rank, world))
    for batch in track(batches, description=f"embedding {shards}", disable=rank != 0):
        out = model(batch.to(device, non_blocking=True))
        small = torch.nn.functional.interpolate(batch.cxr, size=(THUMBNAIL, THUMBNAIL), mode="area")[:, 0]
        lo, hi = small.amin((1, 2), keepdim=True), small.amax((1, 2), keepdim=True)
        parts.append({"vectors": {m: out[m].float().cpu().numpy() for m in MODALITIES},
                      "masks": {"cxr": batch.cxr_mask.numpy(), "ecg": batch.ecg_mask.numpy(),
                                "text": np.array(batch.info.has_text, bool)},
                      "keys": batch.info.keys, "meta": batch.info.meta, "positions": batch.info.positions,
                      "texts": tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True),
                      "thumbnails": ((small - lo) / (hi - lo).clamp(min=1e-6) * 255).to(torch.uint8).numpy()})
    parts = dist.gather_objects(parts)
    if not parts:
        raise ValueError(f"{shards}: no samples to embed")
    order = np.argsort(np.concatenate([p["positions"] for p in parts]), kind="stable")

    def merged(name: str, modality: str | None = None) -> np.ndarray:
        return np.concatenate([p[name] if modality is None else p[name][modality] for p in parts])[order]

    def listed(name: str) -> list:
        flat = [item for p in parts for item in p[name]]
        return [flat[i] for i in order]

    return Embeddings({m: merged("vectors", m) for m in MODALITIES}, {m: merged("masks", m) for m in MODALITIES},
                      listed("keys"), listed("meta"), listed("texts"), merged("thumbnails"), listed("positions"))


@torch.no_grad()
def embed_texts(model: MoRE, tokenizer, pairs: list[tuple[str, str]], pairing: str, max_tokens: int) -> np.ndarray:
    """(radiology, ECG report) pairs -> (len(pairs), D) unit-norm fp32 text embeddings, tokenised as training
    did (`pairing`: data.text_pairing), on the device the model is on (prompts, queries)."""
    device = next(model.parameters()).device
    tokens = tokenize_reports(tokenizer, pairs, pairing, max_tokens).to(device)
    return model.encode("text", tokens["input_ids"], tokens["attention_mask"]).cpu().numpy()
