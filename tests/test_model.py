"""Attention backends against the reference, DropToken/DropKey, stems, the MoRE towers."""

import pytest
import torch
from attention_bounds import attention_error_bound

from more_scale.batch import Batch
from more_scale.config import CxrConfig, EcgConfig, ModelConfig, TextConfig
from more_scale.models.attention import attention, drop_key_mask, math_attention
from more_scale.models.more import build_model, trainable_summary
from more_scale.models.vit import EcgConvStem, build_cxr_encoder, build_ecg_encoder, drop_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [16, 17])
@pytest.mark.parametrize("drop", [0.0, 0.3])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_backends_equal_float64_forward_and_backward(dtype, n, drop, backend):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))
    mask = drop_key_mask((2, 3, n, n), drop, "cpu", generator=g) if drop else None
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = math_attention(*exact_inputs, mask)
    out = attention(q, k, v, backend=backend, keep_mask=mask)
    scale = v.detach().double().abs().max()  # attention averages rows of v
    assert (out.double() - exact).abs().max() <= attention_error_bound(dtype, n, 8, False) * scale
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    exact_grads = torch.autograd.grad(exact.sum(), exact_inputs)
    for name, a, b in zip("qkv", grads, exact_grads):
        bound = attention_error_bound(dtype, n, 8, True) * b.abs().max()
        assert (a.double() - b).abs().max() <= bound, f"d{name}"


def test_drop_key_masks_keys_and_never_a_whole_row():
    keep = drop_key_mask((4, 2, 50, 50), 0.3, "cpu", generator=torch.Generator().manual_seed(0))
    assert 0.65 < keep.float().mean() < 0.75
    assert drop_key_mask((2, 2, 3, 3), 0.999, "cpu").any(-1).all()
    q = torch.randn(1, 1, 5, 4)
    masked = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    masked[..., 2] = True  # every query may attend only key 2
    torch.testing.assert_close(math_attention(q, q, q, masked), q[:, :, 2:3].expand(1, 1, 5, 4))


def test_drop_key_only_in_training():
    q = torch.randn(1, 2, 10, 4)
    assert torch.equal(attention(q, q, q, drop_key=0.5, training=False), attention(q, q, q))
    assert not torch.equal(attention(q, q, q, drop_key=0.5, training=True), attention(q, q, q))
    with pytest.raises(ValueError, match="attention backend 'flash': expected auto or one of"):
        attention(q, q, q, backend="flash")


def test_drop_tokens_keeps_a_per_sample_subset_in_order():
    tokens = torch.arange(2 * 10).float().view(2, 10, 1).expand(2, 10, 3)
    out = drop_tokens(tokens, 0.5)
    assert out.shape == (2, 5, 3)
    for row, src in zip(out[..., 0], tokens[..., 0]):
        assert set(row.tolist()) <= set(src.tolist()) and row.tolist() == sorted(row.tolist())


def test_vit_drop_token_only_in_training_and_cls_output():
    cfg = CxrConfig(width=32, depth=1, heads=2, image_size=32, patch_size=8, drop_token_keep=0.25)
    vit = build_cxr_encoder(cfg)
    seen = []
    vit.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    x = torch.randn(3, 1, 32, 32)
    vit.train()(x)
    vit.eval()(x)
    assert seen == [1 + 4, 1 + 16]  # CLS + 25% of 16 patches in training, all at eval
    assert vit(x).shape == (3, 32)


def test_ecg_stem_gives_196_tokens():
    assert EcgConvStem.tokens(1000) == 196
    vit = build_ecg_encoder(EcgConfig(width=32, depth=1, heads=2, stem_channels=16))
    assert vit.stem(torch.randn(2, 12, 1000)).shape == (2, 196, 32)
    assert vit(torch.randn(2, 12, 1000)).shape == (2, 32)


def _tiny_model(**text):
    cfg = ModelConfig(cxr=CxrConfig(width=32, depth=1, heads=2, image_size=32, patch_size=8),
                      ecg=EcgConfig(width=32, depth=1, heads=2, stem_channels=16),
                      text=TextConfig(random_init=True, hidden=32, layers=1, heads=2, intermediate=64, max_positions=40, lora_r=4,
                                      **text),
                      head_hidden=32, embed_dim=16, temperature=0.07)
    return build_model(cfg, vocab_size=100, pad_token_id=1)


def test_more_forward_unit_norm_and_lora_frozen_base():
    model = _tiny_model()
    batch = Batch.complete(torch.randn(3, 1, 32, 32), torch.randn(3, 12, 1000), torch.randint(3, 100, (3, 12)),
                        torch.ones(3, 12, dtype=torch.long))
    out = model(batch)
    for m in ("cxr", "ecg", "text"):
        assert out[m].shape == (3, 16)
        torch.testing.assert_close(out[m].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    text_params = dict(model.encoders["text"].named_parameters())
    assert all(("lora_" in n) == p.requires_grad for n, p in text_params.items())
    trainable, total = trainable_summary(model)
    assert 0 < trainable < total


def test_text_mean_pooling_ignores_padding():
    model = _tiny_model(dropout=0.0, lora_dropout=0.0).eval()
    ids = torch.randint(3, 100, (1, 6))
    padded = torch.cat([ids, torch.ones(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1).long()
    a = model.encoders["text"](ids, torch.ones(1, 6, dtype=torch.long))
    b = model.encoders["text"](padded, mask)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_tower_equals_eager_and_keeps_its_parameter_names():
    """train.compile=true compiles each tower in place (nn.Module.compile): same outputs, and the same
    state-dict keys, so checkpoints of compiled and eager runs load into each other."""
    torch.manual_seed(0)
    vit = build_cxr_encoder(CxrConfig(width=32, depth=2, heads=2, image_size=32, patch_size=8, attention="sdpa")).eval()
    x = torch.randn(2, 1, 32, 32)
    eager, names = vit(x), list(vit.state_dict())
    vit.compile()
    # fp32 kernels fused differently by inductor: a few ulps of the LayerNorm'd output
    torch.testing.assert_close(vit(x), eager, rtol=1e-5, atol=1e-5)
    assert list(vit.state_dict()) == names


def test_drop_token_gathers_before_adding_positions_with_the_same_result():
    """The kept patches and their position rows are gathered, then added: the same tokens as adding the
    full table and then gathering, without the full-length sum."""
    torch.manual_seed(0)
    vit = build_cxr_encoder(CxrConfig(width=16, depth=1, heads=2, image_size=32, patch_size=8, drop_token_keep=0.5)).train()
    x = torch.randn(3, 1, 32, 32)
    torch.manual_seed(7)
    fused = vit(x)
    torch.manual_seed(7)
    tokens = drop_tokens(vit.stem(x) + vit.pos[:, 1:], 0.5)  # the written-out order: add, then gather
    cls = (vit.cls + vit.pos[:, :1]).expand(3, -1, -1)
    expected = vit.norm(vit.blocks[0](torch.cat([cls, tokens], 1))[:, 0])
    torch.testing.assert_close(fused, expected)
