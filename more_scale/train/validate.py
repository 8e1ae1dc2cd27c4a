"""Evaluation during training, as open_clip users expect: every train.eval_every steps the validation split's
contrastive loss and a fast probe (retrieval recall@5 and zero-shot AUROC), logged beside the training loss.

All ranks share the work: rank r embeds the validation batches r, r + world, ...; the per-batch losses are
summed over ranks, and the embeddings gathered (through dist) so the probe scores every validation sample
against every other. The model runs in eval mode without gradients, and goes back to training after."""

from __future__ import annotations

import numpy as np
import torch

from more_scale import dist
from more_scale.config import Config, input_shape
from more_scale.data.pipeline import iter_batches
from more_scale.eval.embed import Embeddings, embed_texts
from more_scale.eval.metrics import retrieval, zero_shot
from more_scale.eval.tasks import load_tasks
from more_scale.loss import ContrastiveLoss
from more_scale.models.more import MODALITIES

PROBE_TASKS = 4  # binary zero-shot tasks averaged in the probe (the first of the tasks file with labels here)


class Validator:
    def __init__(self, cfg: Config, shards: str, tokenizer, rank: int, world: int):
        self.cfg, self.shards, self.tokenizer, self.rank, self.world = cfg, shards, tokenizer, rank, world
        self.loss = ContrastiveLoss(cfg.loss, 0, 1)  # each validation batch scored on its own (local negatives)
        self.tasks = [t for t in load_tasks() if t.kind == "binary"]

    @torch.no_grad()
    def __call__(self, engine) -> dict[str, float]:
        module = engine.module
        was_training = module.training
        module.eval()
        device, dtype = engine.device, next(p for p in module.parameters() if p.is_floating_point()).dtype
        parts = {m: [] for m in MODALITIES}
        masks, meta, loss_sum, counted = {"cxr": [], "ecg": []}, [], 0.0, 0
        batches = list(iter_batches(self.shards, self.cfg.data, input_shape(self.cfg.model), self.tokenizer))
        # every rank runs the same number of forwards (ZeRO-3 gathers parameters in each): a rank short of
        # real batches repeats one and drops its output
        for step in range(-(-len(batches) // self.world)):
            index = step * self.world + self.rank
            batch = batches[min(index, len(batches) - 1)]
            out = module(batch.to(device, dtype, non_blocking=True))
            if index >= len(batches):
                continue
            loss_sum += float(self.loss(out, batch.cxr_mask.to(device), batch.ecg_mask.to(device))["loss"])
            counted += 1
            for m in MODALITIES:
                parts[m].append(out[m].float())
            masks["cxr"].append(batch.cxr_mask.to(device))
            masks["ecg"].append(batch.ecg_mask.to(device))
            meta += batch.info.meta
        prompts = {t.name: {a: embed_texts(module, self.tokenizer, t.prompts(a), self.cfg.data.text_pairing,
                                            self.cfg.data.max_text_tokens)
                            for a in t.answers} for t in self.tasks[:PROBE_TASKS]}  # every rank: ZeRO-3 again
        module.train(was_training)
        totals = dist.mean_over_ranks({"loss": loss_sum, "batches": float(counted)})
        result = {"val/loss": totals["loss"] / max(totals["batches"], 1e-9)}
        width = self.cfg.model.embed_dim
        gathered = {m: dist.gather_rows(torch.cat(parts[m]) if parts[m] else torch.zeros(0, width, device=device))
                    for m in MODALITIES}
        gathered_masks = {m: dist.gather_rows(torch.cat(masks[m]) if masks[m] else torch.zeros(0, dtype=torch.bool,
                                                                                               device=device))
                          for m in ("cxr", "ecg")}
        all_meta = dist.gather_objects(meta)
        if self.rank != 0:
            return result
        emb = Embeddings({m: v.cpu().numpy() for m, v in gathered.items()},
                         {**{m: v.cpu().numpy() for m, v in gathered_masks.items()},
                          "text": np.ones(len(all_meta), bool)}, [str(i) for i in range(len(all_meta))], all_meta)
        for query, gallery in (("text", "cxr"), ("text", "ecg")):
            r = retrieval(emb, query, gallery, ks=(5,))
            if r["n"]:
                result[f"val/R@5 {query}->{gallery}"] = r["R@5"]
        aurocs = []
        for task in self.tasks[:PROBE_TASKS]:
            score = zero_shot(emb, task, prompts[task.name])
            if score.get("auroc") is not None:
                aurocs.append(score["auroc"])
        if aurocs:
            result["val/zero-shot AUROC"] = float(np.mean(aurocs))
        return result
