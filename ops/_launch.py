"""Launch helpers shared by the Triton-backed LoRA epilogue ops (`ops/swiglu_lora.py`, `ops/qkv_rope_lora.py`)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ops.compile_ahead import gpu_capability


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def as_rows(t: Tensor) -> Tensor:
    """t as [N, width] with unit column stride (a view when it already is one)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def tile_sources(tensors: list[Tensor], block: tuple[int, int]) -> tuple[list[Any], bool]:
    """(sources, tma): the [M, N] tensors as a kernel's `_load_tile` sources, TMA descriptors of [BM, BN] blocks where
    all of them allow one (a GPU with TMA, sm_90 on, or Triton's interpreter; not empty, unit column stride and
    16-byte aligned start and rows, as TMA requires), else the tensors themselves (pointers: the kernel then masks
    its tiles)."""
    t0 = tensors[0]
    interpreted = t0.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    capability = None if interpreted else gpu_capability(t0)
    aligned = all(
        t.dim() == 2
        and t.numel() > 0
        and t.stride(1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
        for t in tensors
    )
    if not aligned or not (interpreted or (capability is not None and capability >= (9, 0))):
        return list(tensors), False
    from triton.tools.tensor_descriptor import TensorDescriptor

    return [TensorDescriptor(t, list(t.shape), list(t.stride()), list(block)) for t in tensors], True


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


# xa in y's tail: a B-less LoRA op with `xa_tail=True` (`ops.lora_linear`, written by `compile_passes/lora_xa_tail.py`)
# returns [y | xa] as one tensor and an empty xa ([N, 0]); its consumer's backward returns [dy | dxa] as one tensor.
# Then the LoRA op's forward is one GEMM against [W; A] and its backward one GEMM of [dy | dxa] against it.


def xa_from_tail(y: Tensor, xa: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(y [..., width], xa [N, r]): views of y's columns when xa came in y's tail (xa is then [N, 0]); else as given."""
    if xa.shape[-1] or y.shape[-1] == width:
        return y, xa
    return y[..., :width], y.reshape(-1, y.shape[-1])[:, width:]


def grad_rows_with_tail(y: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(y's gradient as allocated, [N, width (+ r)]; its first `width` columns: where a kernel writes dy)."""
    full = torch.empty(y.shape, dtype=y.dtype, device=y.device).view(-1, y.shape[-1])
    return full, full[:, :width]


def lora_grad_dtype(lora_mats: list[Tensor]) -> torch.dtype:
    """The dtype the LoRA epilogue ops return their flat gradients in: their LoRA matrices' (one dtype for all: the
    ops' checks). In training the matrices come in their fp32 master dtype (compile_passes/lora_master_dtype.py), so
    the fp32 sums of the kernels' atomics are returned as they are, with no rounding kernel; the gradient of xa (an
    activation) is cast to xa's dtype where it is split off."""
    return lora_mats[0].dtype


def check_lora_mats(op: str, lora_mats: list[Tensor]) -> None:
    if len({m.dtype for m in lora_mats}) > 1 or not all(m.dtype.is_floating_point for m in lora_mats):
        raise ValueError(f"{op}: the LoRA matrices must share one floating dtype, got {[m.dtype for m in lora_mats]}")


def round_lora_grads(flat: Tensor, dy_full: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """The fp32 flat buffer (`lora_grad_buffer`: dxa first) in `dtype` (no kernel when that is fp32). With xa in y's
    tail, dxa is rounded into dy_full's last columns instead, and the buffer returned holds only the rest (its dxa
    part is [N, 0])."""
    m, tail = dy_full.shape[0], dy_full.shape[1] - width
    if not tail:
        return flat.to(dtype)
    dy_full[:, width:].copy_(flat[: m * tail].view(m, tail))
    rest = flat[m * tail :]
    if rest.dtype == dtype and rest.data_ptr() % 16:  # a view past dxa: compiled callers assume 16-byte alignment
        return rest.clone()
    return rest.to(dtype)


def move_dxa_to_tail(dy: Tensor, flat: Tensor, y: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """`round_lora_grads` for the plain-torch backwards, whose dy [..., width] and flat (rounded) come separately."""
    tail = y.shape[-1] - width
    if not tail:
        return dy.view(y.shape), flat
    m = dy.numel() // width
    dxa = flat[: m * tail].view(m, tail).to(dy.dtype)
    return torch.cat([dy.reshape(m, width), dxa], dim=1).view(y.shape), flat[m * tail :]
