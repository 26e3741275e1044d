"""Triton helpers the LoRA epilogue kernels share (`ops/swiglu_lora_kernels.py`, `ops/qkv_rope_lora_kernels.py`).
Imported by those kernel modules only (it needs triton at import); they import the helpers into their own globals,
where Triton (and its interpreter) resolves a kernel's callees."""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 operands (CPU interpreter tests): exact products, not TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_xa(xa_ptr, rm, M, col0, rank, stride_xm, BR: tl.constexpr):
    """xa[rm, col0 : col0 + rank] as [BM, BR] (zero beyond the rank and M)."""
    rr = tl.arange(0, BR)
    mask = (rm[:, None] < M) & (rr[None, :] < rank)
    return tl.load(xa_ptr + rm[:, None] * stride_xm + col0 + rr[None, :], mask=mask, other=0.0)
