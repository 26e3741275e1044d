"""`surogate::keep`: a copy of a small tensor, made so that selective activation checkpointing can save it alone.

Why: the backward of a checkpointed block needs the rank-sized LoRA intermediates xa = x A^T ([tokens, r]) that
feed `low_rank_add` (the o and down projections), but they are outputs of big ops: o's GEMM, and the SwiGLU kernel
that also writes the [tokens, intermediate] activation. A checkpoint policy decides per op, not per output, so
saving xa through its producer would keep the big output too, and recomputing xa recomputes the whole producer
(~150 us of SwiGLU per Qwen3-8B block and micro-step). `compile_passes/keep_lora_xa.py` routes xa through this op
inside checkpointed blocks, and the policy in surogate/recompute.py saves its output: a [tokens, 16] copy, one tiny
kernel, instead of a recomputed SwiGLU or o projection.

It is an op of its own (not `aten.clone`) so that the policy can name it without saving every other copy in the
block. Reference: `x.clone()`; gradient: the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["keep", "keep_reference"]


def keep_reference(x: Tensor) -> Tensor:
    return x.clone()


@torch.library.custom_op("surogate::keep", mutates_args=())
def keep(x: Tensor) -> Tensor:
    """A copy of x (a new tensor: a custom op may not return an alias of its input)."""
    return x.clone()


@keep.register_fake
def _keep_fake(x):
    return torch.empty_like(x)


def _backward(ctx, grad: Tensor) -> Tensor:
    return grad


keep.register_autograd(_backward)
