"""The fused DropKey attention kernel (Triton, run here by Triton's CPU interpreter) and the FlexAttention
baseline, against the float64 written-out reference under the very same mask."""

import dataclasses
import os

import pytest
import torch
from attention_bounds import attention_error_bound

pytest.importorskip("triton")
assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets it: kernels run on CPU tensors only interpreted"

from more_scale.config import CxrConfig  # noqa: E402
from more_scale.kernels.dropkey_attention import dropkey_attention, keep_mask  # noqa: E402
from more_scale.models.attention import attention, flex_dropkey_attention, math_attention  # noqa: E402
from more_scale.models.vit import build_cxr_encoder  # noqa: E402

SEED, OFFSET = 20261128, 7
CASES = [  # (dtype, N, D): odd N, a ragged last tile (70 = 64 + 6), each dtype, D 16 and 32
    (torch.float32, 17, 16), (torch.float32, 70, 32), (torch.bfloat16, 17, 32), (torch.bfloat16, 70, 16),
    (torch.float16, 33, 16)]


def _inputs(dtype, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, d, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def _against_reference(out, q, k, v, mask, dtype, n, d):
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = math_attention(*exact_inputs, mask)
    assert (out.double() - exact).abs().max() <= attention_error_bound(dtype, n, d, False) * v.detach().double().abs().max()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    exact_grads = torch.autograd.grad(exact, exact_inputs, g)
    for name, a, b in zip("qkv", grads, exact_grads):
        assert (a.double() - b).abs().max() <= attention_error_bound(dtype, n, d, True) * b.abs().max() * 4, f"d{name}"


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype, n, d", CASES, ids=[f"{str(c[0])[6:]}-N{c[1]}-D{c[2]}" for c in CASES])
def test_kernel_equals_float64_reference_with_the_same_mask(dtype, n, d, p):
    q, k, v = _inputs(dtype, n, d)
    out = dropkey_attention(q, k, v, p, SEED, OFFSET)
    mask = keep_mask(SEED, OFFSET, (2, 3, n, n), p) if p else None
    # the gradient bound is 4x the backend bound: dS = P (dP - delta) adds one subtraction of near-equal
    # fp32 terms per row that the written-out reference does not have
    _against_reference(out, q, k, v, mask, dtype, n, d)


def test_rows_that_lost_every_key_keep_them_all():
    q, k, v = _inputs(torch.float32, 5, 16)
    mask = keep_mask(SEED, OFFSET, (2, 3, 5, 5), 0.95)
    assert mask.all(-1).any() and not mask.all()  # some rows lost every key (and were restored), others not
    out = dropkey_attention(q, k, v, 0.95, SEED, OFFSET)
    _against_reference(out, q, k, v, mask, torch.float32, 5, 16)


def test_drop_rate_within_binomial_bounds_and_masks_differ_by_seed_offset_and_head():
    p, shape = 0.3, (4, 6, 64, 64)
    keep = keep_mask(SEED, OFFSET, shape, p)
    n = keep.numel()
    dropped = 1 - keep.float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5  # 5 sigma of a binomial: ~1 in 3.5 million false alarms
    assert not torch.equal(keep, keep_mask(SEED + 1, OFFSET, shape, p))
    assert not torch.equal(keep, keep_mask(SEED, OFFSET + 1, shape, p))
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, keep_mask(SEED, OFFSET, shape, p))


def test_strided_inputs_from_a_fused_qkv_projection():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 17, 3, 2, 16, generator=g).requires_grad_()  # (B, N, 3, H, D), as the ViT makes it
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # non-contiguous (B, H, N, D) views
    out = dropkey_attention(q, k, v, 0.3, SEED, OFFSET)
    _against_reference(out, q, k, v, keep_mask(SEED, OFFSET, (2, 2, 17, 17), 0.3), torch.float32, 17, 16)


def test_backend_draws_from_torch_rng_and_checkpoint_recompute_replays_the_mask():
    """The backend takes its seed from torch's CPU generator: same torch seed, same output; a ViT block
    recomputed under activation checkpointing redraws the same mask, so gradients match."""
    torch.manual_seed(0)
    q, k, v = _inputs(torch.float32, 17, 16)
    torch.manual_seed(5)
    a = attention(q, k, v, drop_key=0.3, training=True, backend="triton_dropkey")
    torch.manual_seed(5)
    b = attention(q, k, v, drop_key=0.3, training=True, backend="triton_dropkey")
    c = attention(q, k, v, drop_key=0.3, training=True, backend="triton_dropkey")
    assert torch.equal(a, b) and not torch.equal(a, c)
    cfg = CxrConfig(width=32, depth=2, heads=2, image_size=32, patch_size=8, drop_key=0.3, attention="triton_dropkey")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        vit = build_cxr_encoder(dataclasses.replace(cfg, grad_checkpoint=checkpointing)).train()
        torch.manual_seed(11)
        vit(torch.randn(2, 1, 32, 32)).sum().backward()
        grads.append([p.grad.clone() for p in vit.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=1e-5, atol=1e-6)


def test_explicit_masks_are_refused_by_the_fused_backends():
    q, k, v = _inputs(torch.float32, 9, 16)
    mask = keep_mask(SEED, OFFSET, (2, 3, 9, 9), 0.3)
    for backend in ("triton_dropkey", "flex_dropkey"):
        with pytest.raises(RuntimeError, match="draws its DropKey mask in the kernel"):
            attention(q, k, v, backend=backend, keep_mask=mask)


def test_flex_baseline_forward_equals_the_reference_with_the_kernels_mask():
    q, k, v = (t.detach() for t in _inputs(torch.float32, 17, 16))
    with torch.no_grad():
        out = flex_dropkey_attention(q, k, v, 0.3, SEED, OFFSET)
    expected = math_attention(q, k, v, keep_mask(SEED, OFFSET, (2, 3, 17, 17), 0.3))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_auto_proves_a_backend_before_trusting_it(caplog):
    """The first-use check passes a working kernel and leaves out one that raises, naming the error."""
    from more_scale.models import attention as attn

    good = torch.zeros(1, 2, 9, 16)
    assert attn.proven("triton_dropkey", good)
    broken = torch.zeros(1, 2, 9, 8)  # head dim 8: the kernel refuses it, as a build that fails on a GPU would
    with caplog.at_level("WARNING", logger="more_scale.models.attention"):
        assert not attn.proven("triton_dropkey", broken)
        assert not attn.proven("triton_dropkey", broken)  # asked again: the answer is kept, one warning
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "head dim 8" in warnings[0]
    assert "triton_dropkey is left out of auto: it failed its first-use check" in warnings[0]
    with pytest.raises(ValueError, match="head dim 8"):  # named in the config, it still fails loudly
        dropkey_attention(broken, broken, broken, 0.3, SEED)


def test_offsets_and_seeds_the_runtime_would_specialise_run_the_same_kernel():
    """Offsets 1 and 16 (a constant and a multiple-of-16 hint if specialised) and a small seed give the kernel's mask."""
    q, k, v = _inputs(torch.float32, 17, 16)
    for seed, offset in ((1, 1), (16, 16), (2**40, 2**40)):
        out = dropkey_attention(q, k, v, 0.3, seed, offset)
        _against_reference(out, q, k, v, keep_mask(seed, offset, (2, 3, 17, 17), 0.3), torch.float32, 17, 16)
