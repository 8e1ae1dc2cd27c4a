"""Text tower from a local LM directory, LoRA targets per architecture, export -> reload identity."""

import dataclasses

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from more_scale.batch import Batch
from more_scale.config import CxrConfig, EcgConfig, ModelConfig, TextConfig
from more_scale.export import from_pretrained, save_pretrained
from more_scale.models.more import build_model
from more_scale.models.text import TextEncoder, build_text_encoder, lora_targets


def test_lora_targets_per_architecture():
    assert lora_targets(TextConfig(), "roberta") == ["query", "value"]
    assert lora_targets(TextConfig(), "llama") == ["q_proj", "v_proj"]
    assert lora_targets(TextConfig(lora_targets=("k_proj",)), "llama") == ["k_proj"]
    with pytest.raises(ValueError, match="no default for model type 'gpt_neox'"):
        lora_targets(TextConfig(), "gpt_neox")


def test_local_pretrained_lm_frozen_with_lora(tmp_path):
    torch.manual_seed(0)
    lm = RobertaModel(RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=40), add_pooling_layer=False)
    lm.save_pretrained(tmp_path / "lm")
    encoder = build_text_encoder(TextConfig(pretrained=str(tmp_path / "lm"), lora_r=4), 0, 1)
    base = encoder.lm.get_base_model()
    torch.testing.assert_close(base.embeddings.word_embeddings.weight, lm.embeddings.word_embeddings.weight)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_last_token_pooling_takes_the_last_real_token():
    class Echo(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"last_hidden_state": input_ids.unsqueeze(-1).float()})

    pooled = TextEncoder(Echo(), 1, "last", causal=True)(torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
                                            torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    assert pooled[:, 0].tolist() == [7.0, 9.0]


@pytest.mark.parametrize("arch", ["roberta", "llama"])
def test_the_4d_mask_we_build_equals_transformers_own(arch):
    """We hand the LM a boolean 4D mask (transformers' 2D path asks padding_mask.all(), a host sync per forward):
    the hidden states of real tokens equal those of transformers' own mask, padding in every row or in none."""
    cfg = TextConfig(random_init=True, arch=arch, hidden=32, layers=2, heads=2, intermediate=64, max_positions=40,
                     lora_r=4, dropout=0.0, lora_dropout=0.0, pooling="last" if arch == "llama" else "mean")
    torch.manual_seed(0)
    encoder = build_text_encoder(cfg, 50, 0).eval()
    ids = torch.randint(1, 50, (3, 7))
    for mask in (torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5]), torch.ones(3, 7, dtype=torch.long)):
        theirs = encoder.lm(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = encoder.lm(input_ids=ids, attention_mask=encoder._sdpa_mask(mask)).last_hidden_state
        real = mask.bool()
        torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-6)


def _model_cfg():
    return ModelConfig(cxr=CxrConfig(width=32, depth=1, heads=2, image_size=32, patch_size=8),
                       ecg=EcgConfig(width=32, depth=1, heads=2, stem_channels=8),
                       text=TextConfig(random_init=True, hidden=32, layers=1, heads=2, intermediate=64, max_positions=130,
                                       lora_r=4, dropout=0.0, lora_dropout=0.0),
                       head_hidden=32, embed_dim=16, head="batchnorm")


@pytest.mark.parametrize("merge", [False, True])
def test_export_then_reload_gives_identical_embeddings(tokenizer, tmp_path, merge):
    cfg = _model_cfg()
    torch.manual_seed(0)
    model = build_model(cfg, len(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():  # LoRA B starts at 0: make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()(_batch(tokenizer))  # move BatchNorm running statistics off their defaults
    model.eval()
    save_pretrained(model, cfg, tokenizer, tmp_path / "export", merge_lora=merge)
    assert (tmp_path / "export" / ("text_model" if merge else "text_adapter")).is_dir()
    reloaded, reloaded_cfg, reloaded_tokenizer = from_pretrained(tmp_path / "export")
    assert dataclasses.replace(reloaded_cfg, text=cfg.text) == cfg
    batch = _batch(reloaded_tokenizer)
    with torch.no_grad():
        a, b = model(batch), reloaded(batch)
    for m in ("cxr", "ecg", "text"):
        torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-5)


def _batch(tokenizer):
    g = torch.Generator().manual_seed(1)
    tokens = tokenizer(["The report from Xray is: Heart size is normal.", "The report from ECG is: Sinus rhythm."],
                       padding=True, return_tensors="pt")
    return Batch.complete(torch.randn(2, 1, 32, 32, generator=g), torch.randn(2, 12, 1000, generator=g),
                       tokens["input_ids"], tokens["attention_mask"])


def test_a_pretrained_lm_refuses_a_tokenizer_that_is_not_its_own(shards, tmp_path):
    """The shards' BPE (600 ids) beside an LM that embeds 60: refused before training, naming both; beside an LM
    of 1,000 ids with its own tokenizer: refused as another vocabulary; the LM's own tokenizer passes."""
    from more_scale.config import load_config
    from more_scale.data.tokenizer import train_tokenizer
    from more_scale.train.preflight import InputError, check_inputs

    def config(lm, *extra):
        return load_config("tiny-cpu", [f"data.train={shards / 'train'}", f"model.text.pretrained={lm}",
                                        "model.text.random_init=false",
                                        "data.batch_size=4", *extra])

    small = tmp_path / "small"
    RobertaModel(RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=140)).save_pretrained(small)
    with pytest.raises(InputError, match=r"has 600 ids but model.text.pretrained .*small embeds 60"):
        check_inputs(config(small), 1)
    large = tmp_path / "large"
    RobertaModel(RobertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=140)).save_pretrained(large)
    train_tokenizer(["another corpus entirely, " * 20, "with other words and ids"] * 50, large, 500)
    with pytest.raises(InputError, match=r"is not the tokenizer of model.text.pretrained .*large"):
        check_inputs(config(large), 1)
    check_inputs(config(large, f"data.tokenizer={large}"), 1)
