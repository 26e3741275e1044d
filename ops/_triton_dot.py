"""`_dot`, the `tl.dot` the LoRA epilogue kernels share (`ops/swiglu_lora_kernels.py`, `ops/qkv_rope_lora_kernels.py`).
Imported by those kernel modules only (it needs triton at import)."""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 operands (CPU interpreter tests): exact products, not TF32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)
