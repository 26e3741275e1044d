"""Document isolation in packed rows: a packed row equals its documents run one by one (outputs and gradients)."""

import pytest
import torch

from surogate.attention import (
    attention,
    build_doc_mask,
    one_document_per_row,
    resolve_backend,
    rows_of_one_document,
    varlen_available,
)

DOC_LENS = (5, 11, 8)  # three documents packed into one row of 24


def _packed_position_ids(lens, batch=1):
    return torch.cat([torch.arange(n) for n in lens]).repeat(batch, 1)


def _qkv(B, S, Hq, Hkv, D, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(B, h, S, D, generator=g, device=device, dtype=dtype).requires_grad_() for h in (Hq, Hkv, Hkv)]


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("auto", "cuda") == "flex"
    with pytest.raises(ValueError, match="one of"):
        resolve_backend("xformers", "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("flex", "cpu")


def test_sdpa_mask_blocks_documents():
    mask = build_doc_mask(_packed_position_ids((2, 3)), "sdpa")[0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


def test_packed_row_equals_separate_documents_sdpa():
    S = sum(DOC_LENS)
    q, k, v = _qkv(1, S, 4, 2, 16)
    grad_out = torch.randn(1, 4, S, 16, generator=torch.Generator().manual_seed(1))
    out = attention(q, k, v, build_doc_mask(_packed_position_ids(DOC_LENS), "sdpa"), "sdpa")
    out.backward(grad_out)
    start = 0
    for n in DOC_LENS:
        sl = slice(start, start + n)
        qd, kd, vd = (t.detach()[:, :, sl].clone().requires_grad_() for t in (q, k, v))
        od = attention(qd, kd, vd, build_doc_mask(torch.arange(n)[None], "sdpa"), "sdpa")
        od.backward(grad_out[:, :, sl])
        torch.testing.assert_close(out[:, :, sl], od, rtol=1e-5, atol=1e-6)
        for packed, alone in ((q, qd), (k, kd), (v, vd)):
            torch.testing.assert_close(packed.grad[:, :, sl], alone.grad, rtol=1e-5, atol=1e-6)
        start += n


def _compare_to_sdpa(backend, lens=(100, 300, 37, 75), batch=2, Hq=8, Hkv=2, D=64):
    S = sum(lens)
    pos = _packed_position_ids(lens, batch).cuda()
    pos[1] = torch.arange(S, device="cuda")  # second row: one document
    results = {}
    for name in ("sdpa", backend):
        q, k, v = _qkv(batch, S, Hq, Hkv, D, device="cuda", dtype=torch.bfloat16)
        out = attention(q, k, v, build_doc_mask(pos, name), name)
        out.float().square().sum().backward()
        results[name] = [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]
    for ref, got in zip(results["sdpa"], results[backend]):
        assert torch.isfinite(got).all()
        assert (ref - got).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_matches_sdpa_cuda():
    _compare_to_sdpa("flex")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not varlen_available(), reason="needs CUDA and varlen_attn")
def test_varlen_matches_sdpa_cuda():
    _compare_to_sdpa("varlen")


def test_one_document_per_row_is_read_off_cpu_positions():
    S = sum(DOC_LENS)
    assert one_document_per_row(torch.arange(S).repeat(3, 1))
    assert not one_document_per_row(_packed_position_ids(DOC_LENS, batch=2))
    mixed = torch.arange(S).repeat(2, 1)
    mixed[1] = _packed_position_ids(DOC_LENS)
    assert not one_document_per_row(mixed)  # every row must be one document
    assert not one_document_per_row(torch.arange(1, S + 1)[None])  # a row that starts mid-document
    padded = _packed_position_ids((20, 4), batch=2)  # one document, then the packer's padding tail
    labels = torch.randint(0, 50, (2, 24))
    assert not one_document_per_row(padded, labels)  # the tail is trained: a second document
    labels[:, 20:] = -100
    assert one_document_per_row(padded, labels)
    assert not one_document_per_row(padded)  # without labels a tail is a document


def test_rows_of_one_document_counts_rows_that_may_skip_the_mask():
    S = sum(DOC_LENS)
    rows = torch.cat([torch.arange(S).repeat(3, 1), _packed_position_ids(DOC_LENS, batch=2)])
    assert rows_of_one_document(rows) == 3
    assert rows_of_one_document(_packed_position_ids((20, 4), batch=2)) == 2  # a document and a padding tail


def _causal_vs_masked(device, dtype, tol):
    """mask None (plain causal; cuDNN on CUDA) against SDPA with the dense document mask of one document per row,
    in the [B, S, H, D] -> [B, H, S, D] view layout the model hands over: outputs and gradients."""
    B, S, D = 2, 256, 128
    pos = torch.arange(S, device=device).repeat(B, 1)
    grad_out = torch.randn(B, 8, S, D, generator=torch.Generator(device).manual_seed(1), device=device, dtype=dtype)
    results = []
    for mask in (None, build_doc_mask(pos, "sdpa")):
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in
                   _qkv(B, S, 8, 2, D, device=device, dtype=dtype))  # fmt: skip
        out = attention(q, k, v, mask, "sdpa")
        out.backward(grad_out)
        results.append([out.float(), q.grad.float(), k.grad.float(), v.grad.float()])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= tol * want.abs().max()


def test_causal_path_equals_the_document_mask_of_one_document_per_row():
    _causal_vs_masked("cpu", torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_causal_path_equals_the_document_mask_of_one_document_per_row_cuda():
    _causal_vs_masked("cuda", torch.bfloat16, 2e-2)  # cuDNN's kernel against SDPA's
