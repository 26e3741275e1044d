"""ops.low_rank_add: the in-place rank-r update (Triton kernel against addmm) and the functional
surogate::low_rank_add op (forward, gradients, opcheck) against its plain-torch reference."""

from __future__ import annotations

import pytest
import torch
from lora_cases import deterministic, run_interpreted

from ops.low_rank_add import add_low_rank_, low_rank_add, low_rank_add_reference

OP = torch.ops.surogate.low_rank_add.default
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

_LOW_RANK_INTERPRETED = """
import torch
from ops.low_rank_add import add_low_rank_
g = torch.Generator().manual_seed(7)
# odd sizes, a strided column block of a wider y, a strided A, B as a transposed view, K up to the kernel's limit
for m, n, k, alpha in [(70, 200, 16, 2.0), (64, 128, 48, 1.0), (33, 300, 5, -0.5), (20, 40, 64, 3.0)]:
    y = torch.randn(m, 2 * n, generator=g)[:, n:]
    a = torch.randn(m, 3 * k, generator=g)[:, k : 2 * k]
    b = torch.randn(n, k, generator=g).t()
    want = torch.addmm(y, a, b, alpha=alpha)
    out = add_low_rank_(y, a, b, alpha, block=(32, 64))
    assert out is y
    err = ((y - want).abs().max() / want.abs().max()).item()
    assert err < 1e-6, (m, n, k, err)
print("ok")
"""


def test_add_low_rank_kernel_matches_addmm_interpreted():
    run_interpreted(_LOW_RANK_INTERPRETED)


def test_add_low_rank_falls_back_to_addmm_on_cpu_and_for_wide_k():
    g = torch.Generator().manual_seed(8)
    for k in (16, 65):
        y, a, b = torch.randn(9, 12, generator=g), torch.randn(9, k, generator=g), torch.randn(k, 12, generator=g)
        want = torch.addmm(y, a, b, alpha=0.5)
        assert torch.equal(add_low_rank_(y, a, b, 0.5), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "m, n, k", [(4096, 6144, 48), (4096, 24576, 32), (3000, 8200, 5), (4096, 8192, 64)]
)  # all > 40 MB
def test_add_low_rank_cuda_bf16(m, n, k):
    g = torch.Generator().manual_seed(9)
    y0 = torch.randn(m, n, generator=g).cuda().bfloat16()
    a = torch.randn(m, k, generator=g).cuda().bfloat16()
    b = (torch.randn(n, k, generator=g) * 0.1).cuda().bfloat16().t()
    exact = y0.double() + 2.0 * (a.double() @ b.double())
    y = add_low_rank_(y0.clone(), a, b, 2.0)
    ours = ((y.double() - exact).norm() / exact.norm()).item()
    cublas = torch.addmm(y0, a, b, alpha=2.0)
    theirs = ((cublas.double() - exact).norm() / exact.norm()).item()
    assert torch.isfinite(y).all() and ours < 1e-2 and ours <= 1.01 * theirs + 1e-6, (ours, theirs)


def op_inputs(lead, out, rank, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in lead:
        n *= d
    y = torch.randn(*lead, out, generator=g).to(device, dtype).requires_grad_()
    xa = torch.randn(n, rank, generator=g).to(device, dtype).requires_grad_()
    b = (torch.randn(out, rank, generator=g) * 0.3).to(device, dtype).requires_grad_()
    return y, xa, b


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_against_reference(y, xa, b, scaling, tol, residual=None):
    ref = low_rank_add_reference(y, xa, b, scaling, residual)
    out = low_rank_add(y, xa, b, scaling, residual)
    assert out.shape == y.shape and torch.isfinite(out).all() and rel(out, ref) < tol
    up = torch.randn_like(ref)
    inputs = [y, xa, b] + ([] if residual is None else [residual])
    want = torch.autograd.grad(ref, inputs, up)
    got = torch.autograd.grad(out, inputs, up)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and rel(g, w) < tol, rel(g, w)


@pytest.mark.parametrize("lead,out,rank", [((2, 7), 24, 4), ((33,), 130, 16)])
def test_op_matches_reference_cpu(lead, out, rank):
    check_against_reference(*op_inputs(lead, out, rank), -0.75, 1e-5)


@pytest.mark.parametrize("lead,out,rank", [((2, 7), 24, 4), ((33,), 130, 16)])
def test_op_with_residual_matches_reference_cpu(lead, out, rank):
    y, xa, b = op_inputs(lead, out, rank)
    residual = torch.randn(y.shape).requires_grad_()
    check_against_reference(y, xa, b, 1.25, 1e-5, residual)


def test_op_opcheck():
    torch.library.opcheck(OP, (*op_inputs((3, 5), 16, 4), 2.0))
    y, xa, b = op_inputs((3, 5), 16, 4)
    torch.library.opcheck(OP, (y, xa, b, 2.0, torch.randn(y.shape, requires_grad=True)))
    g = torch.randn(y.shape)
    torch.library.opcheck(torch.ops.surogate.low_rank_add_grad.default, (g, xa.detach(), b.detach(), 2.0))


def test_op_refuses_a_residual_of_another_shape():
    y, xa, b = op_inputs((3, 5), 16, 4)
    with pytest.raises(ValueError, match="residual"):
        low_rank_add(y, xa, b, 2.0, torch.randn(15, 16))


def test_op_kernel_matches_reference_interpreted():
    run_interpreted(
        """
import torch
import ops.low_rank_add as lr
from ops.low_rank_add import low_rank_add, low_rank_add_reference
lr._LOW_RANK_MIN_BYTES = 0
g = torch.Generator().manual_seed(3)
for lead, n_out, r in [((70,), 200, 16), ((3, 11), 40, 5)]:
    y = torch.randn(*lead, n_out, generator=g)
    xa = torch.randn(y.numel() // n_out, r, generator=g)
    b = torch.randn(n_out, r, generator=g)
    for residual in (None, torch.randn(y.shape, generator=g)):
        out = low_rank_add(y, xa, b, 1.5, residual)
        want = low_rank_add_reference(y, xa, b, 1.5, residual)
        assert torch.isfinite(out).all() and ((out - want).norm() / want.norm()).item() < 1e-6
    # the backward's kernel (dxa and dB from one read of g; several row tiles per program, the last past M)
    lr._GRAD_CONFIG = (16, 32, 4, 3)
    xa_, b_ = xa.clone().requires_grad_(), b.clone().requires_grad_()
    up = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(low_rank_add(y, xa_, b_, 1.5), [xa_, b_], up)
    want = torch.autograd.grad(low_rank_add_reference(y, xa_, b_, 1.5), [xa_, b_], up)
    for a, w in zip(got, want):
        assert torch.isfinite(a).all() and ((a - w).norm() / w.norm()).item() < 1e-6
print("ok")
"""
    )


def test_op_with_b_in_master_dtype_cpu():
    """B in fp32 with bf16 activations (compile_passes/lora_master_dtype.py): cast on use, its gradient in fp32."""
    y, xa, b = op_inputs((2, 9), 48, 8, torch.bfloat16)
    b = b.detach().float().requires_grad_()
    check_against_reference(y, xa, b, 2.0, 1e-2)
    grad_b = torch.autograd.grad(low_rank_add(y, xa, b, 2.0), b, torch.randn(y.shape, dtype=y.dtype))[0]
    assert grad_b.dtype == torch.float32


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,out", [(4096, 4096), (4096, 8192)])  # below and above the Triton path's size
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("b_dtype", [torch.bfloat16, torch.float32])  # fp32: the master (lora_master_dtype.py)
def test_op_cuda_bf16(m, out, with_residual, b_dtype):
    y, xa, b = op_inputs((m,), out, 16, torch.bfloat16, "cuda")
    b = b.detach().to(b_dtype).requires_grad_()
    residual = torch.randn(y.shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) if with_residual else None
    check_against_reference(y, xa, b, 2.0, 1e-2, residual)


@pytest.mark.gpu
@needs_cuda
def test_op_opcheck_cuda():
    torch.library.opcheck(OP, (*op_inputs((2, 64), 256, 16, torch.bfloat16, "cuda"), 2.0))
    y, xa, b = op_inputs((2, 64), 256, 16, torch.bfloat16, "cuda")
    with deterministic():  # fp32 master B: its gradient's last bits vary with the atomics' order otherwise
        torch.library.opcheck(OP, (y, xa, b.detach().float().requires_grad_(), 2.0))
