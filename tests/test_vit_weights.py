"""ViT features: DropKey schedules, checkpointing, positional interpolation, ECG stems, weights in."""

import dataclasses

import pytest
import torch
from transformers import ViTConfig, ViTModel

from more_scale.config import CxrConfig, EcgConfig
from more_scale.models import attention as attn
from more_scale.models.vit import build_cxr_encoder, build_ecg_encoder, drop_key_rates, interpolate_pos
from more_scale.models.vit_weights import load_vit_weights

TINY = CxrConfig(width=32, depth=2, heads=2, mlp_ratio=2.0, image_size=32, patch_size=8, channels=3, norm_eps=1e-12)


@pytest.mark.parametrize("backend", attn.BACKENDS)
def test_every_available_backend_equals_math_with_dropkey(backend):
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))
    reason = attn.unsupported_reason(backend, q, drop_key_active=True)
    if reason:
        with pytest.raises(RuntimeError, match="cannot run this call"):
            attn.attention(q, k, v, backend=backend, keep_mask=attn.drop_key_mask((2, 2, 9, 9), 0.3, "cpu"))
        pytest.skip(reason)
    mask = attn.drop_key_mask((2, 2, 9, 9), 0.3, "cpu", torch.Generator().manual_seed(1))
    out, ref = attn.attention(q, k, v, backend=backend, keep_mask=mask), attn.math_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_auto_picks_the_fastest_measured_backend_once_per_shape(monkeypatch):
    timings = {"sdpa": 2.0, "math": 1.0}  # this machine's "measurement": math wins
    calls = []

    def timed(backend, shape, dtype, device, drop_key):
        calls.append((backend, shape))
        return timings[backend]

    monkeypatch.setattr(attn, "_time_backend", timed)
    attn._fastest.cache_clear()
    q = torch.randn(1, 2, 5, 8)
    assert attn.resolve("auto", q, drop_key_active=True) == "math"
    assert attn.resolve("auto", q, drop_key_active=True) == "math"
    assert len(calls) == 2  # each candidate timed once for this shape, then the answer is cached
    timings["sdpa"] = 0.5
    assert attn.resolve("auto", torch.randn(1, 2, 7, 8), drop_key_active=True) == "sdpa"  # a new shape is measured
    attn._fastest.cache_clear()
    monkeypatch.undo()
    q9 = torch.randn(1, 2, 9, 8)
    state = torch.get_rng_state()
    attn.resolve("auto", q9, drop_key_active=True)  # a real measurement
    assert torch.equal(torch.get_rng_state(), state)  # ... leaves the RNG DropKey and DropToken draw from alone
    assert "flash_attn" not in attn.available(q, drop_key_active=True)
    with pytest.raises(RuntimeError, match="flash_attn"):
        attn.resolve("flash_attn", q, drop_key_active=False)


def test_drop_key_schedules():
    cfg = dataclasses.replace(TINY, depth=3, drop_key=0.3)
    assert drop_key_rates(cfg) == [0.3] * 3
    assert drop_key_rates(dataclasses.replace(cfg, drop_key_schedule="linear")) == pytest.approx([0.3, 0.15, 0.0])
    vit = build_cxr_encoder(dataclasses.replace(cfg, drop_key_schedule="linear"))
    assert [b.attn.drop_key for b in vit.blocks] == pytest.approx([0.3, 0.15, 0.0])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_cxr_encoder(TINY).train()
    checkpointed = build_cxr_encoder(dataclasses.replace(TINY, grad_checkpoint=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain(x).square().sum().backward()
    checkpointed(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_positional_interpolation():
    pos = torch.randn(1, 17, 4)
    assert interpolate_pos(pos, (4, 4), (4, 4)) is pos
    out = interpolate_pos(pos, (4, 4), (8, 8))
    assert out.shape == (1, 65, 4) and torch.equal(out[:, 0], pos[:, 0])
    flat = torch.ones(1, 17, 4)
    torch.testing.assert_close(interpolate_pos(flat, (4, 4), (6, 6)), torch.ones(1, 37, 4))
    assert interpolate_pos(pos, (4, 4), (12, 20)).shape == (1, 241, 4)  # image table onto ECG lead patches


def test_ecg_lead_by_time_stem():
    cfg = EcgConfig(width=32, depth=1, heads=2, stem="patch", patch_samples=50)
    vit = build_ecg_encoder(cfg)
    assert vit.stem(torch.randn(2, 12, 1000)).shape == (2, 240, 32)
    assert vit.pos.shape == (1, 241, 32) and vit(torch.randn(2, 12, 1000)).shape == (2, 32)


@pytest.fixture
def hf_vit_dir(tmp_path):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8, num_channels=3, layer_norm_eps=1e-12),
                     add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path / "vit", safe_serialization=True)
    return tmp_path / "vit", model


def test_hf_vit_directory_gives_the_same_cls_features(hf_vit_dir):
    directory, reference = hf_vit_dir
    ours = build_cxr_encoder(TINY).eval()
    load_vit_weights(ours, directory)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_timm_state_dict_with_rgb_stem_into_gray_model_and_new_grid(hf_vit_dir, tmp_path):
    directory, _ = hf_vit_dir
    rgb = build_cxr_encoder(TINY).eval()
    load_vit_weights(rgb, directory)
    timm = {"cls_token": rgb.cls, "pos_embed": rgb.pos, "patch_embed.proj.weight": rgb.stem.proj.weight,
            "patch_embed.proj.bias": rgb.stem.proj.bias, "head.weight": torch.zeros(10, 32)}
    timm.update({k: v for k, v in rgb.state_dict().items() if k.startswith(("blocks.", "norm."))})
    torch.save({"model": {k: v.detach().clone() for k, v in timm.items()}}, tmp_path / "timm.pth")

    gray = build_cxr_encoder(dataclasses.replace(TINY, channels=1)).eval()
    report = load_vit_weights(gray, tmp_path / "timm.pth")
    assert report.unexpected == ["head.weight"] and report.missing == [] and report.skipped == []
    assert report.adapted == ["patch_embed.proj.weight RGB->gray"]
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gray(image), rgb(image.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-5)

    bigger = build_cxr_encoder(dataclasses.replace(TINY, image_size=64))
    report = load_vit_weights(bigger, tmp_path / "timm.pth")
    assert report.adapted == ["pos_embed (4, 4)->(8, 8)"]
    ecg = build_ecg_encoder(EcgConfig(width=32, depth=2, heads=2, mlp_ratio=2.0, stem_channels=8))
    report = load_vit_weights(ecg, tmp_path / "timm.pth")  # the ViT body fits; the image stem does not
    assert any(s.startswith("patch_embed.proj.weight") for s in report.unexpected + report.skipped)
    assert "blocks.0.attn.qkv.weight" in report.loaded


def test_missing_weights_path_is_a_clear_error(tmp_path):
    from more_scale.config import ModelConfig, TextConfig
    from more_scale.models.more import build_model

    cfg = ModelConfig(cxr=dataclasses.replace(TINY, pretrained=str(tmp_path / "nope.pth")),
                      ecg=EcgConfig(width=32, depth=1, heads=2, stem_channels=8),
                      text=TextConfig(random_init=True, hidden=32, layers=1, heads=2, intermediate=64), head_hidden=32,
                      embed_dim=16)
    with pytest.raises(FileNotFoundError, match="no such ViT weights"):
        build_model(cfg, 100, 1)  # the model config's pretrained path is read when the model is built
