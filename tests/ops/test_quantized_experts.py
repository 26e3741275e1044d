"""Quantized expert stacks (ops/quantized_experts.py): storage formats against ops/fp8.py and ops/nf4.py, the grouped
GEMM op forward and dX against the plain-torch references, what autograd keeps, the FP8 Triton dequantization."""

import pytest
import torch
from lora_cases import run_interpreted

from ops import fp8, nf4
from ops import quantized_experts as qe
from ops.grouped_mm import grouped_mm_reference

TOL = {"fp8": 5e-2, "nf4": 1e-1}  # relative error of the format on normal weights (Frobenius)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _stack(E=5, out=48, inp=128, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, out, inp, generator=g) * 0.05).to(dtype)


def _rows(E, inp, sizes=(7, 0, 12, 1, 9), seed=1, dtype=torch.float32):
    """x sorted by expert with these group sizes (an empty expert included) and the op's int32 end offsets."""
    g = torch.Generator().manual_seed(seed)
    sizes = list(sizes)[:E]
    x = torch.randn(sum(sizes), inp, generator=g).to(dtype)
    return x, torch.tensor(sizes).cumsum(0).to(torch.int32)


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_roundtrip_error_within_format_tolerance(fmt):
    w = _stack()
    stored = qe.quantize_experts(w, fmt)
    dense = qe.dequantize_experts(stored, fmt, torch.float32)
    assert dense.shape == w.shape and torch.isfinite(dense).all()
    err = _rel(dense, w)
    assert 1e-4 < err < TOL[fmt], err  # quantized (not a copy) and within the format's rounding


def test_fp8_stack_is_rowwise_fp8_of_each_expert():
    w = _stack(dtype=torch.bfloat16)
    codes, scale = qe.quantize_experts(w, "fp8")
    assert codes.dtype == fp8.E4M3 and codes.shape == w.shape and scale.shape == w.shape[:2]
    for e in range(w.shape[0]):  # the same codes and scales as FP8LoRALinear would store for expert e alone
        c, s = fp8.quantize_rows_reference(w[e])
        assert torch.equal(codes[e].view(torch.uint8), c.view(torch.uint8)) and torch.equal(scale[e], s.view(-1))
        assert torch.equal(qe.dequantize_experts([codes, scale], "fp8", torch.bfloat16)[e], fp8.dequantize(c, s))


def test_nf4_stack_is_nf4_of_the_flattened_stack():
    w = _stack()
    stored = qe.quantize_experts(w, "nf4")
    E, out, inp = w.shape
    assert stored[0].shape == (E, out, inp // 2) and stored[0].dtype == torch.uint8
    flat = nf4.quantize_nf4(w.reshape(E * out, inp))
    assert all(torch.equal(a.reshape(-1), b.reshape(-1)) for a, b in zip(stored, flat))
    ref = nf4.dequantize_nf4_reference(*flat, torch.float32).view(E, out, inp)
    assert torch.equal(qe.dequantize_experts(stored, "nf4", torch.float32), ref)


@pytest.mark.parametrize("fmt,ratio", [("fp8", 0.5), ("nf4", 0.257)])
def test_stored_bytes(fmt, ratio):
    w = _stack(E=4, out=256, inp=512, dtype=torch.bfloat16)
    got = qe.expert_nbytes(qe.quantize_experts(w, fmt)) / (w.numel() * w.element_size())
    assert ratio <= got < ratio + 0.01, got


def test_bad_format_and_shape_are_refused():
    with pytest.raises(ValueError, match="format"):
        qe.quantize_experts(_stack(), "fp4")
    with pytest.raises(ValueError, match="divisible by 64"):
        qe.quantize_experts(_stack(inp=96), "nf4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_op_forward_and_dx_vs_references(fmt, dtype):
    w = _stack()
    stored = qe.quantize_experts(w, fmt)
    x, offs = _rows(w.shape[0], w.shape[2], dtype=dtype)
    x.requires_grad_()
    y = qe.quantized_grouped_mm(x, stored, offs, fmt, False)
    dy = torch.cos(torch.arange(y.numel(), dtype=torch.float32)).view_as(y).to(dtype)
    (gx,) = torch.autograd.grad(y, x, dy)

    xr = x.detach().clone().requires_grad_()
    y_ref = qe.quantized_grouped_mm_reference(xr, stored, offs, fmt)  # the same dequantized weights, a segment loop
    (gx_ref,) = torch.autograd.grad(y_ref, xr, dy)
    exact = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y, y_ref, rtol=exact, atol=exact)
    torch.testing.assert_close(gx, gx_ref, rtol=exact, atol=exact)
    assert y[7:7].numel() == 0 and gx.abs().sum() > 0

    # Against the unquantized fp32 weights: the format's rounding only.
    x32 = x.detach().float().requires_grad_()
    y32 = grouped_mm_reference(x32, w, offs)
    (gx32,) = torch.autograd.grad(y32, x32, dy.float())
    assert _rel(y, y32) < TOL[fmt] and _rel(gx, gx32) < TOL[fmt]


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_backward_dequantizes_again_and_saves_no_dense_stack(fmt):
    w = _stack()
    stored = qe.quantize_experts(w, fmt)
    x, offs = _rows(w.shape[0], w.shape[2])
    x.requires_grad_()
    saved = []
    qe.stats.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qe.quantized_grouped_mm(x, stored, offs, fmt, False)
    assert qe.stats["experts_dequantized"] == 1
    assert not any(t.is_floating_point() and t.numel() >= w.numel() for t in saved if t.dtype != fp8.E4M3)
    assert sum(t.numel() * t.element_size() for t in saved) <= qe.expert_nbytes(stored) + offs.numel() * 4
    y.sum().backward()
    assert qe.stats["experts_dequantized"] == 2  # dX dequantized the stack again
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_frozen_stack_required():
    stored = qe.quantize_experts(_stack(), "fp8")
    stored[1].requires_grad_()
    x, offs = _rows(5, 128)
    with pytest.raises(RuntimeError, match="never computes a weight gradient"):
        qe.quantized_grouped_mm(x.requires_grad_(), stored, offs, "fp8", False)


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_op_compiles_in_one_graph(fmt):
    torch._dynamo.reset()
    stored = qe.quantize_experts(_stack(), fmt)
    x, offs = _rows(5, 128)

    def f(x):
        return torch.ops.surogate.quantized_grouped_mm.default(x, stored, offs, fmt, False).square().sum()

    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    f(x1).backward()
    torch.compile(f, fullgraph=True, backend="aot_eager")(x2).backward()
    torch.testing.assert_close(x2.grad, x1.grad)


_INTERPRETED = """
import torch
from ops.quantized_experts import dequantize_experts_fp8_triton, dequantize_experts_reference, quantize_experts
g = torch.Generator().manual_seed(5)
for E, out, inp, elems in [(3, 5, 40, 64), (4, 16, 128, 4096), (1, 1, 8, 16)]:  # partial programs, row crossings
    stored = quantize_experts(torch.randn(E, out, inp, generator=g) * 0.05, "fp8")
    f32 = dequantize_experts_fp8_triton(*stored, torch.float32, elems=elems)
    assert torch.equal(f32, dequantize_experts_reference(stored, "fp8", torch.float32))
    # The interpreter's fp32->bf16 cast truncates; the GPU's rounds to nearest even (test_fp8_triton_on_gpu).
    bf16 = dequantize_experts_fp8_triton(*stored, torch.bfloat16, elems=elems)
    assert torch.equal(bf16, (f32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16))
print("ok")
"""


def test_fp8_triton_dequantize_matches_reference_interpreted():
    pytest.importorskip("triton")
    run_interpreted(_INTERPRETED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_op_on_gpu_matches_reference(fmt):
    w = _stack(E=8, out=768, inp=2048, dtype=torch.bfloat16).cuda()
    stored = qe.quantize_experts(w, fmt)
    ref = qe.dequantize_experts_reference([t.cpu() for t in stored], fmt, torch.bfloat16)
    assert torch.equal(qe.dequantize_experts(stored, fmt, torch.bfloat16).cpu(), ref)
    x, offs = _rows(8, 2048, sizes=(64, 0, 128, 16, 256, 8, 32, 40), dtype=torch.bfloat16)
    x, offs = x.cuda().requires_grad_(), offs.cuda()
    y = qe.quantized_grouped_mm(x, stored, offs, fmt, False)
    y_ref = qe.quantized_grouped_mm_reference(x.detach(), stored, offs, fmt)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
