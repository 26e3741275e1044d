"""chunked_lm_loss against F.cross_entropy(reduction="sum") on fresh random inputs (fp32)."""

import pytest
import torch
import torch.nn.functional as F

from surogate.loss import chunked_lm_loss


def _inputs(N=37, H=48, V=517, ignored=0.3, seed=0, weight_grad=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignored] = -100
    labels[0] = -100  # at least one ignored row, whatever the draw
    return hidden, weight, labels


def _reference(hidden, weight, labels):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = F.cross_entropy(h @ w.T, labels, reduction="sum", ignore_index=-100)
    loss.backward()
    return loss, h.grad, w.grad


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk_size", [1, 8, 10, 37, 4096])  # 10 and 8 do not divide the valid row count
@pytest.mark.parametrize("select_valid", [True, False])
def test_matches_cross_entropy_frozen_head(chunk_size, select_valid):
    hidden, weight, labels = _inputs(seed=chunk_size)
    ref_loss, ref_dh, _ = _reference(hidden, weight, labels)
    loss, n = chunked_lm_loss(hidden, weight, labels, chunk_size=chunk_size, select_valid=select_valid)
    (2.5 * loss).backward()  # a non-unit upstream gradient checks the scaling in backward
    assert loss.dtype == torch.float32 and n.dtype == torch.int64
    assert n.item() == (labels != -100).sum().item()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= 1e-5
    assert _rel_err(hidden.grad, 2.5 * ref_dh) <= 1e-5
    assert hidden.grad[labels == -100].abs().max() == 0
    assert weight.grad is None  # frozen LM head: no weight gradient


def test_trainable_head_gets_weight_gradient():
    hidden, weight, labels = _inputs(weight_grad=True, seed=3)
    ref_loss, ref_dh, ref_dw = _reference(hidden, weight, labels)
    loss, _ = chunked_lm_loss(hidden, weight, labels, chunk_size=7)
    loss.backward()
    assert _rel_err(hidden.grad, ref_dh) <= 1e-5
    assert _rel_err(weight.grad, ref_dw) <= 1e-5


def test_all_rows_ignored_gives_zero_loss_and_grad():
    hidden, weight, labels = _inputs(seed=4)
    labels[:] = -100
    for select_valid in (True, False):
        h = hidden.detach().clone().requires_grad_()
        loss, n = chunked_lm_loss(h, weight, labels, chunk_size=8, select_valid=select_valid)
        loss.backward()
        assert loss.item() == 0 and n.item() == 0 and h.grad.abs().max() == 0


def test_bf16_close_to_fp32():
    hidden, weight, labels = _inputs(seed=5)
    ref_loss, ref_dh, _ = _reference(hidden, weight, labels)
    h = hidden.detach().bfloat16().requires_grad_()
    loss, _ = chunked_lm_loss(h, weight.detach().bfloat16(), labels, chunk_size=16)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= 1e-2
    assert _rel_err(h.grad.float(), ref_dh) <= 2e-2


def test_compiles():
    hidden, weight, labels = _inputs(seed=6)
    ref_loss, ref_dh, _ = _reference(hidden, weight, labels)
    fn = torch.compile(chunked_lm_loss, fullgraph=True, dynamic=False)
    loss, _ = fn(hidden, weight, labels, chunk_size=16, select_valid=False)
    loss.backward()
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() <= 1e-5
    assert _rel_err(hidden.grad, ref_dh) <= 1e-5


@pytest.mark.parametrize("select_valid", [True, False])
def test_fp8_head_matches_the_fp8_reference_and_stays_near_exact(select_valid):
    """fp8=True: logits from e4m3 h and W (rowwise), grad_h from e5m2 dlogits and W^T's own e4m3 codes; against the
    same quantize -> dequantize arithmetic in plain torch (tight) and the exact loss (FP8 tolerance)."""
    from ops import fp8

    fp8.clear_fp8_weight_cache()
    hidden, weight, labels = _inputs(N=64, H=48, V=512, seed=3)
    before = fp8.stats["fp8_gemms"]
    loss, n = chunked_lm_loss(hidden, weight, labels, chunk_size=16, select_valid=select_valid, fp8=True)
    loss.backward()
    chunks = -(-(n.item() if select_valid else 64) // 16)
    assert fp8.stats["fp8_gemms"] - before == 2 * chunks  # logits and grad_h of every chunk ran as FP8 GEMMs

    def deq(t, fmt, dim_rows=True):
        codes, scale = fp8.quantize_rows_reference(t if dim_rows else t.t().contiguous(), fmt)
        out = codes.float() * scale
        return out if dim_rows else out.t()

    h = hidden.detach().clone().requires_grad_()
    logits = deq(h.detach(), fp8.E4M3) @ deq(weight, fp8.E4M3).T
    valid = labels != -100
    ref = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
    dlogits = torch.softmax(logits, -1) - F.one_hot(labels.clamp_min(0), 512).float()
    dlogits = dlogits * valid[:, None]
    ref_dh = deq(dlogits, fp8.E5M2) @ deq(weight, fp8.E4M3, dim_rows=False)
    assert _rel_err(loss, ref) < 1e-5 and _rel_err(hidden.grad, ref_dh) < 1e-5
    exact_loss, exact_dh, _ = _reference(hidden, weight, labels)
    assert torch.isfinite(hidden.grad).all()
    assert 0 < _rel_err(loss, exact_loss) < 2e-2 and _rel_err(hidden.grad, exact_dh) < 0.1


def test_fp8_head_refuses_a_trainable_head():
    hidden, weight, labels = _inputs(weight_grad=True)
    with pytest.raises(ValueError, match="frozen LM head"):
        chunked_lm_loss(hidden, weight, labels, fp8=True)
