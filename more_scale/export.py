"""Export a trained MoRE in `save_pretrained` style and read it back with `from_pretrained` (or
`more_scale.load`, which adds the preprocessing).

DIR/config.json             model config (text.pretrained names the LM folder below), vocabulary size, pad id,
                            the input format (preprocessing), what it was trained from
DIR/model.safetensors       both ViTs, the three heads, the logit scale (everything but the LM)
DIR/text_base/ + text_adapter/   the LM without LoRA (AutoModel-loadable) + peft's LoRA adapter, whose
                            base_model_name_or_path is text_base/'s absolute path (peft resolves it from the
                            working directory, so a relative one would not load), or
DIR/text_model/             with merge_lora: the LM with LoRA merged in (plain AutoModel, no peft)
DIR/tokenizer/              model_max_length = the text length trained with
DIR/README.md               a model card: what it is, how to load it, the input format, provenance, metrics
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from more_scale.config import ModelConfig, build_section
from more_scale.data.input_format import InputFormat
from more_scale.data.tokenizer import load_tokenizer
from more_scale.models.more import MoRE, build_model

TEXT_LM = "encoders.text.lm."


def save_pretrained(model: MoRE, cfg: ModelConfig, tokenizer, out: str | Path, merge_lora: bool = False,
                    inputs: InputFormat | None = None, trained: dict | None = None, results: dict | None = None) -> Path:
    """`inputs`: the preprocessing training used (recorded; `more_scale.load` needs it); `trained`: provenance
    (run, checkpoint, step, git revision); `results`: an evaluation's results.json, summarised in the card."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(TEXT_LM)}
    save_file(state, str(out / "model.safetensors"))
    peft_lm = model.encoders["text"].lm
    if merge_lora:
        copy.deepcopy(peft_lm).merge_and_unload().save_pretrained(str(out / "text_model"))
    else:
        copy.deepcopy(peft_lm).unload().save_pretrained(str(out / "text_base"))
        peft_lm.save_pretrained(str(out / "text_adapter"))
        adapter_config = out / "text_adapter" / "adapter_config.json"
        fields = json.loads(adapter_config.read_text())
        fields["base_model_name_or_path"] = str((out / "text_base").resolve())  # peft's loaders open it offline
        adapter_config.write_text(json.dumps(fields, indent=2))
    tokenizer = copy.copy(tokenizer)
    if inputs is not None:  # a long report with truncation=True is cut where training cut it, not at 1e30
        tokenizer.model_max_length = inputs.max_text_tokens
    tokenizer.save_pretrained(str(out / "tokenizer"))
    text_dir = "text_model" if merge_lora else "text_base"
    exported = dataclasses.replace(cfg, cxr=dataclasses.replace(cfg.cxr, pretrained=""),  # their weights are here
                                   ecg=dataclasses.replace(cfg.ecg, pretrained=""),
                                   text=dataclasses.replace(cfg.text, pretrained=text_dir, random_init=False))
    meta = {"model": dataclasses.asdict(exported), "merged_lora": merge_lora, "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id, "inputs": inputs.to_dict() if inputs else None,
            "trained": {**(trained or {}), "text_base_was": cfg.text.pretrained or "random init (seeded)"}}
    (out / "config.json").write_text(json.dumps(meta, indent=1))
    (out / "README.md").write_text(model_card(meta, results))
    return out


def from_pretrained(directory: str | Path) -> tuple[MoRE, ModelConfig, object]:
    """(model in eval mode with gradients off, its config, tokenizer) from a save_pretrained directory."""
    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    cfg = build_section(ModelConfig, meta["model"], "model.")
    text_dir = directory / ("text_model" if meta["merged_lora"] else "text_base")  # beside config.json, wherever it is
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pretrained=str(text_dir)))
    model = build_model(cfg, meta["vocab_size"], meta["pad_token_id"])
    if not meta["merged_lora"]:
        adapter = load_file(str(directory / "text_adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model.encoders["text"].lm, adapter)
        if result.unexpected_keys:
            raise ValueError(f"{directory}/text_adapter: unexpected LoRA keys {result.unexpected_keys[:4]}")
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith(TEXT_LM)]
    if missing or unexpected:
        raise ValueError(f"{directory}/model.safetensors does not match its config (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    # for inference: eval mode, gradients off (requires_grad_(True) on what a fine-tune should train)
    return model.eval().requires_grad_(False), cfg, load_tokenizer(directory / "tokenizer")


def model_card(meta: dict, results: dict | None) -> str:
    """The export's README.md: what it is, how to load it, its input format, provenance and (when given) metrics."""
    m, inputs, trained = meta["model"], meta["inputs"], meta["trained"]
    lines = ["# MoRE embedding model (more_scale export)", "",
             "One embedding space for chest X-rays, 12-lead ECGs and their reports: an X-ray ViT "
             f"(width {m['cxr']['width']}, depth {m['cxr']['depth']}), an ECG ViT (width {m['ecg']['width']}, depth "
             f"{m['ecg']['depth']}) and a {'LoRA-merged' if meta['merged_lora'] else 'LoRA-tuned'} "
             f"{m['text']['arch']} text tower, each with a projection head to {m['embed_dim']} dimensions.", "",
             "## Load", "", "```python", "import more_scale", "model = more_scale.load(\"THIS_FOLDER\")  # eval mode, no grad",
             "x = model.embed_cxr([\"study.jpg\"]); t = model.embed_text([\"Cardiomegaly.\"]); print(x @ t.T)", "```", "",
             "The text tower alone: `transformers.AutoModel.from_pretrained(\"THIS_FOLDER/"
             f"{m['text']['pretrained']}\")`" + ("" if meta["merged_lora"] else
             " plus `peft.PeftModel.from_pretrained(base, \"THIS_FOLDER/text_adapter\")` (or "
             "`peft.AutoPeftModel.from_pretrained(\"THIS_FOLDER/text_adapter\")` where the export was written: "
             "its base path is absolute)") + "; the towers and heads: `safetensors.torch.load_file(\"THIS_FOLDER/"
             "model.safetensors\")`.", "", "## Input format", ""]
    if inputs:
        lines += [f"- {line}." for line in InputFormat.from_dict(inputs, "config.json").describe()] + [""]
    else:
        lines += ["Not recorded (exported without it): `more_scale.load` refuses this folder.", ""]
    lines += ["## Provenance", ""] + [f"- {key}: {value}" for key, value in trained.items()] + [""]
    if results:
        from more_scale.eval.evaluate import verdict, with_ci

        lines += ["## Evaluation", "", f"Zero-shot on {results.get('shards')} ({results.get('samples')} samples; "
                  "bootstrap 95% intervals):", "", "| task | n (positive) | AUROC [95% CI] | chance | vs chance |",
                  "|---|---|---|---|---|"]
        for name, r in results.get("zero_shot", {}).items():
            if r.get("auroc") is not None:
                lines.append(f"| {name} | {r['n']} ({r.get('n_positive')}) | {with_ci(r, 'auroc')} | "
                             f"{r['chance_auroc']:.3f} | {verdict(r)} |")
        lines.append("")
    return "\n".join(lines)
