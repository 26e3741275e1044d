"""Cross-entropy forward and logits-gradient in one pass over a chunk of logits (`surogate::cross_entropy_grad_`).

Why: with Qwen3's 151,936-token vocabulary the chunked LM-head loss (`surogate/loss.py`) spends more GPU time on
the elementwise softmax chain (upcast, logsumexp's max/sub/exp/sum/log, exp, scatter, mask, downcast: about eight
passes over an fp32 [rows, V] buffer) than on the LM-head GEMM itself for small models. This kernel reads each row
of bf16 logits twice (an online max/sum-exp pass, then the gradient pass) and writes the gradient over the logits
in place, in the logits' dtype, ready for the `dlogits @ W` GEMM:

    loss[r]      = (logsumexp(z[r]) - z[r, y[r]])          if y[r] != ignore_index else 0
    z[r, :]     <- softmax(z[r]) - onehot(y[r])            if y[r] != ignore_index else 0

All arithmetic is fp32 whatever the logits dtype (the order Hugging Face uses: bf16 logits, fp32 softmax).
`cross_entropy_grad_reference` is the plain-torch definition, also the CPU path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cross_entropy_grad_", "cross_entropy_grad_reference", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def cross_entropy_grad_reference(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(per-row loss fp32 [R], dlogits [R, V] in logits.dtype); plain torch."""
    valid = labels != IGNORE_INDEX
    y = torch.where(valid, labels, 0)[:, None]
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss = (lse - z.gather(1, y)).squeeze(1) * valid
    grad = (z - lse).exp_()
    grad.scatter_add_(1, y, -torch.ones_like(y, dtype=grad.dtype))
    grad *= valid[:, None]
    return loss, grad.to(logits.dtype)


def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ce_grad_kernel(z_ptr, labels_ptr, loss_ptr, V, stride_row, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_row
        label = tl.load(labels_ptr + row)
        # Pass 1: online max and sum of exp over the row, in fp32.
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = label != ignore_index
        safe_label = tl.where(valid, label, 0)
        z_label = tl.load(z_row + safe_label).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - z_label, 0.0))
        # Pass 2: softmax - onehot, zero for ignored rows, written over the logits.
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            z = tl.load(z_row + cols, mask=in_row, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) - tl.where(cols == safe_label, 1.0, 0.0)
            g = tl.where(valid, g, 0.0)
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=in_row)

    return ce_grad_kernel


_KERNEL = None


def cross_entropy_grad_triton(logits: Tensor, labels: Tensor, block: int = 4096) -> Tensor:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1 in tests)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _triton_kernel()
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_grad_ needs logits with contiguous rows")
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _KERNEL[(rows,)](logits, labels, loss, vocab, logits.stride(0), IGNORE_INDEX, BLOCK=block, num_warps=16)
    return loss


@torch.library.custom_op("surogate::cross_entropy_grad_", mutates_args=("logits",))
def cross_entropy_grad_(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row loss (fp32 [R]); overwrites `logits` [R, V] with d(sum loss)/d(logits). See the module docstring."""
    if logits.device.type == "cuda":
        return cross_entropy_grad_triton(logits, labels)
    loss, grad = cross_entropy_grad_reference(logits, labels)
    logits.copy_(grad)
    return loss


@cross_entropy_grad_.register_fake
def _(logits: Tensor, labels: Tensor) -> Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.float32)
