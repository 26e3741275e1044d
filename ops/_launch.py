"""Launch helpers shared by the Triton-backed LoRA epilogue ops (`ops/swiglu_lora.py`, `ops/qkv_rope_lora.py`)."""

from __future__ import annotations

from torch import Tensor


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def as_rows(t: Tensor) -> Tensor:
    """t as [N, width] with unit column stride (a view when it already is one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rank_block(lora_Bs: list[Tensor]) -> int:
    """The kernels' inner size for the LoRA products: the largest rank, padded to a power of two >= 16 (tl.dot)."""
    return max(16, 1 << (max(b.shape[1] for b in lora_Bs) - 1).bit_length())
