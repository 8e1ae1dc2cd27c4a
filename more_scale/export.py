"""Export a trained MoRE in `save_pretrained` style and read it back with `from_pretrained`.

DIR/config.json             model config + vocabulary size and pad id
DIR/model.safetensors       both ViTs, the three heads, the logit scale (everything but the LM)
DIR/text_base/ + text_adapter/   the LM without LoRA (AutoModel-loadable) + peft's LoRA adapter, or
DIR/text_model/             with merge_lora: the LM with LoRA merged in (plain AutoModel, no peft)
DIR/tokenizer/
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from more_scale.config import ModelConfig, build_section
from more_scale.data.tokenizer import load_tokenizer
from more_scale.models.more import MoRE, build_model

TEXT_LM = "encoders.text.lm."


def save_pretrained(model: MoRE, cfg: ModelConfig, tokenizer, out: str | Path, merge_lora: bool = False) -> Path:
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
    tokenizer.save_pretrained(str(out / "tokenizer"))
    exported = dataclasses.replace(cfg, cxr=dataclasses.replace(cfg.cxr, pretrained=""),
                                   ecg=dataclasses.replace(cfg.ecg, pretrained=""))
    (out / "config.json").write_text(json.dumps({"model": dataclasses.asdict(exported), "merged_lora": merge_lora,
                                                 "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id},
                                                indent=1))
    return out


def from_pretrained(directory: str | Path) -> tuple[MoRE, ModelConfig, object]:
    """(model in eval mode, its config, tokenizer) from a save_pretrained directory."""
    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    cfg = build_section(ModelConfig, meta["model"], "model.")
    text_dir = directory / ("text_model" if meta["merged_lora"] else "text_base")
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
    return model.eval(), cfg, load_tokenizer(directory / "tokenizer")
