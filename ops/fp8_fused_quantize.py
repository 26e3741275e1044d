"""Rowwise FP8 quantization fused with the LoRA low-rank product that reads the same tensor.

The FP8 LoRA op (ops/fp8.py) reads each activation twice per GEMM side in the unfused form:

    forward   x  -> quantize_rows(x)  (for the FP8 GEMM)     and   x  @ A^T  (the LoRA down-projection, [N, r])
    backward  dy -> quantize_rows(dy) (for the FP8 dX GEMM)  and   dy @ B    (the LoRA gradient path, [N, r])

The quantize kernel walks every row anyway (absmax pass, then the scale-and-cast pass), so it can multiply the
tile it has loaded by the [K, r] low-rank matrix as it goes: one read of x (or dy) from HBM instead of two. The
product accumulates in fp32 from bf16 operands (`tl.dot`, as cuBLAS's bf16 GEMM does) and is rounded once to the
activation dtype. Optional `col_scale` multiplies the *quantized* path only (qfp8 folds the weight's row scales
into dy before quantizing, see ops/fp8.py); the low-rank product always uses the tensor as given.

Layout: a program owns BLOCK_M rows (`tl.dot` needs at least 16) and walks K in BLOCK_K tiles, twice. Ranks are
padded to a power of two >= 16 inside the kernel (masked loads), so q/k/v's 3 x 16 = 48 runs as 64.

`quantize_rows_lowrank_reference` is the plain-torch definition; the kernel is tested against it on the GPU and,
upcast to fp32 (the interpreter computes bf16 `tl.dot` wrongly), under TRITON_INTERPRET=1 on CPU.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["quantize_rows_lowrank", "quantize_rows_lowrank_reference"]

_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_EPS = 1e-12  # the same absmax floor as ops.fp8.quantize_rows


def quantize_rows_lowrank_reference(
    x: Tensor,  # [M, K]
    low_rank: Tensor,  # [K, R]
    dtype: torch.dtype,
    col_scale: Tensor | None = None,  # [K]
) -> tuple[Tensor, Tensor, Tensor]:  # codes [M, K], scale [M, 1] fp32, product [M, R] in x.dtype
    fmax = _FP8_MAX[dtype]
    xf = x.float() if col_scale is None else x.float() * col_scale.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_EPS)
    codes = (xf * (fmax / amax)).clamp(-fmax, fmax).to(dtype)
    return codes, amax / fmax, (x.float() @ low_rank.float()).to(x.dtype)


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize_rows_lowrank_kernel(
        x_ptr, col_ptr, l_ptr, q_ptr, s_ptr, p_ptr,
        M, K, R, stride_x, stride_q, stride_lk, stride_lr, stride_p,
        FMAX: tl.constexpr, HAS_COL: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        ranks = tl.arange(0, BLOCK_R)
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
        amax = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for start in range(0, K, BLOCK_K):  # pass 1: absmax per row, and the low-rank product
            cols = start + tl.arange(0, BLOCK_K)
            cmask = cols < K
            x = tl.load(x_rows + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            lr = tl.load(
                l_ptr + cols[:, None] * stride_lk + ranks[None, :] * stride_lr,
                mask=cmask[:, None] & (ranks[None, :] < R),
                other=0.0,
            )
            if UPCAST:
                acc += tl.dot(x.to(tl.float32), lr.to(tl.float32))
            else:
                acc += tl.dot(x, lr)
            v = x.to(tl.float32)
            if HAS_COL:
                v = v * tl.load(col_ptr + cols, mask=cmask, other=0.0)[None, :]
            amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
        amax = tl.maximum(amax, 1e-12)
        inv = FMAX / amax
        tl.store(s_ptr + rows, amax / FMAX, mask=rmask)
        p = p_ptr + rows[:, None].to(tl.int64) * stride_p + ranks[None, :]
        tl.store(p, acc.to(p_ptr.dtype.element_ty), mask=rmask[:, None] & (ranks[None, :] < R))
        q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_q
        for start in range(0, K, BLOCK_K):  # pass 2: scale, saturate, cast (the tiles are in L2 from pass 1)
            cols = start + tl.arange(0, BLOCK_K)
            mask = rmask[:, None] & (cols[None, :] < K)
            v = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_COL:
                v = v * tl.load(col_ptr + cols, mask=cols < K, other=0.0)[None, :]
            q = tl.minimum(tl.maximum(v * inv[:, None], -FMAX), FMAX)
            tl.store(q_rows + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)

    return quantize_rows_lowrank_kernel


_KERNEL = None


def quantize_rows_lowrank(
    x: Tensor,
    low_rank: Tensor,
    dtype: torch.dtype,
    col_scale: Tensor | None = None,
    block_m: int = 16,
    block_k: int = 128,
) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, scale, x @ low_rank) in one pass over x: the kernel on CUDA (or under TRITON_INTERPRET=1), the
    reference elsewhere. `low_rank` may be any strided [K, R] view (e.g. `A.t()`)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if x.device.type != "cuda" and not interpreted:
        return quantize_rows_lowrank_reference(x, low_rank, dtype, col_scale)
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _kernel()
    if x.stride(-1) != 1:
        x = x.contiguous()
    (m, k), r = x.shape, low_rank.shape[1]
    codes = torch.empty(m, k, dtype=dtype, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    product = torch.empty(m, r, dtype=x.dtype, device=x.device)
    col = col_scale.float().contiguous() if col_scale is not None else scale  # dummy pointer when unused
    if m:
        _KERNEL[(-(-m // block_m),)](
            x, col, low_rank, codes, scale, product,
            m, k, r, x.stride(0), codes.stride(0), low_rank.stride(0), low_rank.stride(1), product.stride(0),
            FMAX=_FP8_MAX[dtype], HAS_COL=col_scale is not None, UPCAST=interpreted,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=max(16, 1 << (r - 1).bit_length()), num_warps=4,
        )  # fmt: skip
    return codes, scale, product
