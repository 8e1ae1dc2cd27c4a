"""The scale path at toy size: a decoder LLM text tower (Llama architecture, random init) with LoRA on
q_proj/v_proj, activation checkpointing and last-token pooling, built partitioned under ZeRO-3 on 2 CPU
ranks: it trains, checkpoints, resumes and exports, and the export reads back to the same embeddings."""

import re

import torch
from conftest import launcher, run_launcher
from test_faults_train import _port

LLAMA = ["model.text.arch=llama", "model.text.pooling=last", "model.text.grad_checkpoint=true", "model.text.kv_heads=2",
         "model.text.dropout=0.0", "train.deepspeed_config=zero3", "train.steps=4",
         "train.warmup_steps=1", "train.log_every=1", "data.batch_size=4", "data.workers=1"]


def _train(shards, out, *extra):
    """fp32 unless `extra` says bf16 (llm7b.yaml's precision; a slow path on CPUs without AVX-512 BF16)."""
    precision = [] if any(e.startswith("train.precision=") for e in extra) else ["train.precision=fp32"]
    return run_launcher([launcher("torchrun"), "--nproc_per_node", "2", "--master_port", _port(), "launch/train.py",
                         "--config", "tiny-cpu", f"data.train={shards / 'train'}", f"output_dir={out}", *LLAMA,
                         *precision, *extra])


def test_llama_lora_tower_under_zero3_trains_resumes_and_exports(shards, tmp_path):
    from launch_helpers import export_main

    from more_scale.batch import Batch
    from more_scale.eval.embed import load_trained
    from more_scale.export import from_pretrained

    out = tmp_path / "run"
    first = _train(shards, out, "train.stop_at_step=2")
    held, total = map(lambda s: int(s.replace(",", "")),
                      re.search(r"this rank holds ([\d,]+) of the ([\d,]+) parameters", first.stdout).groups())
    assert held <= total // 2 + 1000  # partitioned at construction: each rank holds about half
    assert "LlamaModel" not in first.stderr or "Traceback" not in first.stderr
    second = _train(shards, out, "train.resume=auto")
    assert "start step 2 of 4" in second.stdout and "done: step 4" in second.stdout
    model, cfg, tokenizer = load_trained(out)
    assert cfg.model.text.arch == "llama" and type(model.encoders["text"].lm.get_base_model()).__name__ == "LlamaModel"
    assert export_main(["--checkpoint", str(out), "--out", str(tmp_path / "export")]) == 0
    reloaded, _, _ = from_pretrained(tmp_path / "export")
    tokens = tokenizer(["The report from ECG is: Sinus rhythm.", "The report from Xray is: Clear lungs."],
                       padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    batch = Batch.complete(torch.randn(2, 1, 64, 64, generator=g), torch.randn(2, 12, 1000, generator=g),
                           tokens["input_ids"], tokens["attention_mask"])
    with torch.no_grad():
        a, b = model(batch), reloaded.eval()(batch)
    for m in ("cxr", "ecg", "text"):
        torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-5)
