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


def lora_grad_buffer(m: int, rank: int, b_shapes: list) -> list[tuple[int, ...]]:
    """The layout of the flat gradient buffer the LoRA epilogue ops' backwards return: dxa [m, rank], then each
    dB [N_i, r_i], back to back. One buffer, so the backward zeroes its fp32 atomics targets with one kernel and
    rounds them with one more, instead of two per tensor (~3 us each on the GPU, per block and micro-step)."""
    return [(m, rank), *(tuple(s) for s in b_shapes)]


def split_flat(flat: Tensor, shapes: list[tuple[int, ...]]) -> list[Tensor]:
    """Views of `flat` with the given shapes, back to back (the layout of `lora_grad_buffer`)."""
    sizes = [a * b for a, b in shapes]
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]
