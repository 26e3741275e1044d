"""The rank-r update `y + s * xa B^T`: in place (`add_low_rank_`, used inside the LoRA ops) and as a functional op
with autograd (`torch.ops.surogate.low_rank_add`, written into the graph by `compile_passes/down_lora_fusion.py`),
optionally with the residual stream added in the same pass (`compile_passes/residual_lora_fusion.py`).

Why a kernel: this is pure memory traffic (read y, write the sum; xa and B are a few hundred KB), and cuBLAS's
addmm with an inner dimension of 16-48 streams a large y at ~1.9 TB/s on an H100, where a tiled Triton kernel that
does the whole inner dimension in one `tl.dot` per tile streams it at ~2.7. Same arithmetic as addmm (fp32 products
and sum, y + s * acc in fp32, rounded once).

Why a functional op: the graph form `y + s * mm(xa, B.t())` costs Inductor an [N, out] GEMM output written and read
again, and Inductor splits an `addmm` whose user is pointwise into exactly that (its bias-unfusing pattern), so the
down projection's LoRA update cost ~65 us per Qwen3-8B block and micro-step instead of ~17 (H100 profile,
benchmarks/NOTES.md). As an opaque op it is one pass over y. With `residual` it is also the block's residual add
(out = residual + y + s xa B^T, summed in fp32 and rounded once): one read of y and of the residual and one write,
where the add on its own would read the update's output again and write another [N, out] tensor.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ops._launch import cdiv
from ops.compile_ahead import compile_ahead, launch, on_gpu, shared

__all__ = ["add_low_rank_", "low_rank_add", "low_rank_add_reference", "mm_scaled"]

_LOW_RANK_MAX_K = 64  # the Triton path covers LoRA ranks (and a group's summed ranks) up to this
# ... and outputs above this size. H100, rank 16-48, TB/s of y read + written (Triton [64, 128] tiles vs addmm_):
# [4096, 24576] 2.69 vs 1.87, [4096, 12288] 2.64 vs 1.84, [4096, 6144] 2.41 vs 2.28, but [4096, 4096] 3.54 vs
# 3.85: an output that (mostly) fits in L2 is cuBLAS's.
_LOW_RANK_MIN_BYTES = 40 << 20


def low_rank_add_reference(y: Tensor, xa: Tensor, b: Tensor, scaling: float, residual: Tensor | None = None) -> Tensor:
    """y [..., out] + scaling * xa [N, r] B^T (B [out, r], cast to xa's dtype), N = prod of y's leading dims; plus
    `residual` (y's shape) when given."""
    out = y + scaling * (xa @ b.to(xa.dtype).t()).view_as(y)
    return out if residual is None else residual + out


def mm_scaled(a: Tensor, b: Tensor, s: float) -> Tensor:
    """`s * (a @ b)` as one GEMM: the scale is the GEMM's alpha (exact, no extra pass over the result). With beta=0
    the accumulator's contents are ignored (documented: not even NaN propagates), so it may be uninitialized."""
    if s == 1.0:
        return torch.mm(a, b)
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=s)


def _triton_low_rank_add_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def low_rank_add_kernel(
        y_ptr, r_ptr, o_ptr, a_ptr, b_ptr, M, N, K, stride_ym, stride_yn, stride_rm, stride_om, stride_on, stride_am,
        stride_ak, stride_bk, stride_bn, alpha,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        # One [BM, BN] tile: the whole (tiny) inner dimension in one dot, then y (and the residual: rows of unit
        # column stride) read, added to, written to o.
        rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
        rk = tl.arange(0, BK)
        a_mask = (rm[:, None] < M) & (rk[None, :] < K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=a_mask, other=0.0)
        b_mask = (rk[:, None] < K) & (rn[None, :] < N)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=b_mask, other=0.0)
        b = b.to(a.dtype)  # B may come in its fp32 master dtype (compile_passes/lora_master_dtype.py)
        if IEEE:  # fp32 operands (CPU interpreter tests): exact products, not TF32
            acc = tl.dot(a, b, input_precision="ieee")
        else:
            acc = tl.dot(a, b)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        y = tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, mask=mask, other=0.0).to(tl.float32)
        out = y + alpha * acc
        if RESIDUAL:
            out += tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        out = out.to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out, mask=mask)

    return low_rank_add_kernel


def _triton_low_rank_grad_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def low_rank_grad_kernel(
        g_ptr, xa_ptr, b_ptr, dxa_ptr, db_ptr, M, N, R, stride_gm, stride_xm, stride_bn, scale, row_tiles,
        BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        # One column block of g over a run of row tiles: dB's block summed in registers over the run (one atomic
        # add at the end), each tile's part of dxa (summed over columns) added with fp32 atomics. g is read once.
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        col_ok = (rn[:, None] < N) & (rr[None, :] < R)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=col_ok, other=0.0).to(g_ptr.dtype.element_ty)
        db = tl.zeros((BN, BR), tl.float32)
        for i in range(row_tiles):
            rm = ((tl.program_id(1) * row_tiles + i) * BM + tl.arange(0, BM)).to(tl.int64)
            row_ok = rm[:, None] < M
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :], mask=row_ok & (rn[None, :] < N), other=0.0)
            xa = tl.load(xa_ptr + rm[:, None] * stride_xm + rr[None, :], mask=row_ok & (rr[None, :] < R), other=0.0)
            if IEEE:  # fp32 operands (CPU interpreter tests): exact products, not TF32
                part = tl.dot(g, b, input_precision="ieee")
                db += tl.dot(tl.trans(g), xa, input_precision="ieee")
            else:
                part = tl.dot(g, b)
                db += tl.dot(tl.trans(g), xa)
            tl.atomic_add(dxa_ptr + rm[:, None] * R + rr[None, :], scale * part, mask=row_ok & (rr[None, :] < R),
                          sem="relaxed")  # fmt: skip
        tl.atomic_add(db_ptr + rn[:, None] * R + rr[None, :], scale * db, mask=col_ok, sem="relaxed")

    return low_rank_grad_kernel


_low_rank_kernel = shared(_triton_low_rank_add_kernel)  # made at the first launch, one object for every thread
_low_rank_grad_kernel = shared(_triton_low_rank_grad_kernel)
# (BM, BN, warps, row tiles per program). H100, 4096 rows, r 16 (scratch sweep, NOTES 2026-11-27 session 20): among
# the best three on 4B/8B/14B widths (2560/4096/5120), 14.0 us against cuBLAS's pair 19.8 us on 8B.
_GRAD_CONFIG = (32, 128, 4, 8)


def _low_rank_add_into(
    out: Tensor, y: Tensor, a: Tensor, b: Tensor, alpha: float, block: tuple[int, int], residual: Tensor | None = None
) -> Tensor:
    """out = y + alpha * (a @ b) (+ residual) for 2-D y, out and residual (out may be y: in place)."""
    triton_ok = on_gpu(y) or os.environ.get("TRITON_INTERPRET") == "1"
    # cuBLAS adds one tensor (its C): with a residual the kernel is one pass where addmm + add would be two
    small = on_gpu(y) and y.numel() * y.element_size() < _LOW_RANK_MIN_BYTES and residual is None
    if not triton_ok or small or a.shape[1] > _LOW_RANK_MAX_K or y.dtype != a.dtype:
        b = b.to(a.dtype)  # B may come in its master dtype (the kernel casts it on load)
        if out is y:
            out.addmm_(a, b, alpha=alpha)
        else:
            torch.addmm(y, a, b, alpha=alpha, out=out)
        return out if residual is None else out.add_(residual)
    (m, n), k = y.shape, a.shape[1]
    bm, bn = block
    res = y if residual is None else residual  # never read without RESIDUAL
    if m and n:
        launch(
            _low_rank_kernel(), (cdiv(m, bm), cdiv(n, bn)),
            y, res, out, a, b, m, n, k, y.stride(0), y.stride(1), res.stride(0), out.stride(0), out.stride(1),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), float(alpha),
            BM=bm, BN=bn, BK=max(16, 1 << (k - 1).bit_length()), RESIDUAL=residual is not None,
            IEEE=y.dtype == torch.float32, num_warps=4,
        )  # fmt: skip
    return out


def add_low_rank_(y: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, block: tuple[int, int] = (64, 128)) -> Tensor:
    """`y += alpha * (a @ b)` in place: y [M, N] (rows may be strided: a column block of a wider output), a [M, K],
    b [K, N] with a small K (the LoRA rank). The LoRA update of the base output (forward) and of the base dX
    (backward, shared input). The Triton kernel for CUDA outputs over `_LOW_RANK_MIN_BYTES` (or CPU tensors under
    TRITON_INTERPRET=1 in tests); `addmm_` otherwise and for K above `_LOW_RANK_MAX_K`."""
    return _low_rank_add_into(y, y, a, b, alpha, block)


# ----------------------------------------------------------------------------------------------------------------
# The functional op


@torch.library.custom_op("surogate::low_rank_add", mutates_args=())
def low_rank_add(y: Tensor, xa: Tensor, b: Tensor, scaling: float, residual: Tensor | None = None) -> Tensor:
    """y [..., out] + scaling * xa [N, r] B^T (B [out, r]) (+ residual, y's shape) as a new tensor, one pass."""
    if residual is not None and residual.shape != y.shape:
        raise ValueError("low_rank_add: the residual must have y's shape")
    return _low_rank_add(y, xa, b, scaling, residual)


def _low_rank_add(y: Tensor, xa: Tensor, b: Tensor, scaling: float, residual: Tensor | None) -> Tensor:
    y2 = y.reshape(-1, y.shape[-1])
    r2 = None if residual is None else residual.reshape(-1, y.shape[-1])
    if r2 is not None and r2.stride(-1) != 1:
        r2 = r2.contiguous()
    out = torch.empty(y2.shape, dtype=y.dtype, device=y.device)
    return _low_rank_add_into(out, y2, xa, b.t(), scaling, (64, 128), r2).view(y.shape)


@low_rank_add.register_fake
def _low_rank_add_fake(y, xa, b, scaling, residual=None):
    compile_ahead(_low_rank_add, y, xa, b, scaling, residual)  # ops/compile_ahead.py
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    _y, xa, b, scaling, residual = inputs
    ctx.save_for_backward(xa, b)
    ctx.scaling = scaling
    ctx.has_residual = residual is not None


@torch.library.custom_op("surogate::low_rank_add_grad", mutates_args=())
def low_rank_add_grad(grad_out: Tensor, xa: Tensor, b: Tensor, scaling: float) -> Tensor:
    """[grad_xa = s g B | grad_B = s g^T xa] flat in B's dtype (one output: an op's outputs may not alias),
    `_grad_views` splits it. One Triton kernel reads g once for both (CUDA, or CPU tensors under TRITON_INTERPRET=1);
    elsewhere two GEMMs with the scale as their alpha, where graph ops would add a multiply kernel per product. With
    B in its fp32 master dtype (compile_passes/lora_master_dtype.py) the kernel's fp32 sums are returned unrounded."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    triton_ok = on_gpu(g2) or os.environ.get("TRITON_INTERPRET") == "1"
    deterministic = torch.are_deterministic_algorithms_enabled()  # the kernel sums with atomics
    if not triton_ok or deterministic or not _grad_kernel_takes(g2, xa, b):
        dxa, db = mm_scaled(g2, b.to(g2.dtype), scaling), mm_scaled(g2.t(), xa, scaling)
        return torch.cat([dxa.flatten(), db.flatten()]).to(b.dtype)
    return _low_rank_grad_triton(g2, xa, b, scaling)


def _grad_kernel_takes(g2: Tensor, xa: Tensor, b: Tensor) -> bool:
    """Whether the one-kernel gradient covers these operands: a LoRA-sized rank, g and xa of one dtype (B of theirs
    or fp32)."""
    return xa.shape[1] <= _LOW_RANK_MAX_K and g2.dtype == xa.dtype and b.dtype in (xa.dtype, torch.float32)


def _low_rank_grad_triton(g2: Tensor, xa: Tensor, b: Tensor, scaling: float) -> Tensor:
    (m, n), r = g2.shape, xa.shape[1]
    g2, xa, b = (t if t.stride(-1) == 1 else t.contiguous() for t in (g2, xa, b))
    flat = torch.zeros(m * r + n * r, device=g2.device, dtype=torch.float32)  # atomics accumulate in fp32
    if m and n and r:
        bm, bn, warps, per_program = _GRAD_CONFIG
        launch(
            _low_rank_grad_kernel(), (cdiv(n, bn), cdiv(cdiv(m, bm), per_program)),
            g2, xa, b, flat, flat[m * r :], m, n, r, g2.stride(0), xa.stride(0), b.stride(0), float(scaling),
            per_program, BM=bm, BN=bn, BR=max(16, 1 << (r - 1).bit_length()), IEEE=g2.dtype == torch.float32,
            num_warps=warps,
        )  # fmt: skip
    return flat.to(b.dtype)


@low_rank_add_grad.register_fake
def _low_rank_add_grad_fake(grad_out, xa, b, scaling):
    compile_ahead(_grad_ahead, grad_out, xa, b, scaling)
    return b.new_empty(xa.numel() + b.numel())


def _grad_ahead(grad_out: Tensor, xa: Tensor, b: Tensor, scaling: float) -> None:
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    if _grad_kernel_takes(g2, xa, b):
        _low_rank_grad_triton(g2, xa, b, scaling)


def _grad_views(flat: Tensor, xa: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return flat[: xa.numel()].view(xa.shape), flat[xa.numel() :].view(b.shape)


def _backward(ctx, grad_out):
    xa, b = ctx.saved_tensors
    grad_xa, grad_b = _grad_views(low_rank_add_grad(grad_out, xa, b, ctx.scaling), xa, b)
    return grad_out, grad_xa.to(xa.dtype), grad_b, None, grad_out if ctx.has_residual else None


low_rank_add.register_autograd(_backward, setup_context=_setup_context)
