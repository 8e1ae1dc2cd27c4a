"""The FLOPs behind MFU: models/flops.py against torch's FlopCounterMode on a real forward + backward."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from more_scale.batch import Batch
from more_scale.config import CxrConfig, EcgConfig, LossConfig, ModelConfig, TextConfig
from more_scale.loss import ContrastiveLoss
from more_scale.models.flops import step_flops
from more_scale.models.more import MODALITIES, build_model

SMALL = ModelConfig(cxr=CxrConfig(width=96, depth=2, heads=4, image_size=64, patch_size=8, attention="math"),
                    ecg=EcgConfig(width=96, depth=2, heads=4, stem_channels=32, attention="math"),
                    text=TextConfig(random_init=True, hidden=96, layers=3, heads=4, intermediate=192, max_positions=130,
                                    dropout=0.0),
                    head_hidden=64, embed_dim=32)


def counted(cfg: ModelConfig, rows: int, length: int) -> tuple[float, float]:
    """(FlopCounterMode's count of one training forward + backward, models/flops.py's prediction)."""
    torch.manual_seed(0)
    model = build_model(cfg, 300, 1).train()
    batch = Batch.complete(torch.randn(rows, cfg.cxr.channels, cfg.cxr.image_size, cfg.cxr.image_size),
                           torch.randn(rows, 12, cfg.ecg.samples), torch.randint(3, 300, (rows, length)),
                           torch.ones(rows, length, dtype=torch.long))
    counter = FlopCounterMode(display=False)
    # the math kernel: CPU SDPA's fused kernel is not in the counter's table, its matmuls are
    with counter, sdpa_kernel(SDPBackend.MATH):
        emb = {m: model.embed(m, batch) for m in MODALITIES}
        emb["logit_scale"] = model.scale()
        ContrastiveLoss(LossConfig(), 0, 1)(emb, batch.cxr_mask, batch.ecg_mask)["loss"].backward()
    return counter.get_total_flops(), step_flops(model, cfg).per_step(rows, length)


@pytest.mark.parametrize("keep", [1.0, 0.5])
@pytest.mark.parametrize("lora_bias", ["none", "all"])
@pytest.mark.parametrize("stem", ["conv", "patch"])
def test_step_flops_equal_the_flop_counter(keep, lora_bias, stem):
    cfg = dataclasses.replace(SMALL, cxr=dataclasses.replace(SMALL.cxr, drop_token_keep=keep),
                              ecg=dataclasses.replace(SMALL.ecg, drop_token_keep=keep, stem=stem, patch_samples=50),
                              text=dataclasses.replace(SMALL.text, lora_bias=lora_bias))
    measured, predicted = counted(cfg, rows=4, length=24)
    # left out on purpose, both well under 0.1% here: the loss's similarity products (B x B x D), and with
    # frozen embeddings the first LM layer's dK, which the math kernel skips and fused GPU kernels compute
    assert predicted == pytest.approx(measured, rel=1e-3)


def test_drop_token_and_text_length_change_the_count_as_the_shapes_do():
    half = dataclasses.replace(SMALL, cxr=dataclasses.replace(SMALL.cxr, drop_token_keep=0.5))
    torch.manual_seed(0)
    full_flops = step_flops(build_model(SMALL, 300, 1), SMALL)
    half_flops = step_flops(build_model(half, 300, 1), half)
    assert half_flops.fixed < full_flops.fixed  # fewer X-ray tokens in every block
    assert full_flops.per_step(4, 48) == pytest.approx(4 * full_flops.per_sample(48))
    assert full_flops.per_sample(48) > full_flops.per_sample(24)
