"""Chunked LM head + cross-entropy that never holds [tokens x vocab] fp32 logits.

With Qwen3's 151,936-token vocabulary, the logits of a 16k-token step in fp32 are ~10 GB, and autograd would keep
them (plus the softmax) alive until backward. Instead, as in Liger's fused linear cross-entropy, the forward walks
over chunks of rows and, for each chunk, computes

    logits = h_c @ W.T                    (matmul in the activation dtype, then fp32: the order HF uses)
    loss  += sum(logsumexp(logits) - logits[label])
    dlogits = softmax(logits) - onehot(label)      (zero on ignored rows)
    grad_h[c] = dlogits @ W               (and grad_W += dlogits.T @ h_c only if W is trainable)

so only grad_h ([N, H], the size of the input) survives until backward, which just scales it by the incoming
gradient. A frozen LM head (the LoRA case) gets no weight gradient and costs no [V, H] fp32 buffer. On CUDA the
middle two lines are one Triton kernel that writes dlogits over the chunk's logits (ops/cross_entropy.py).

Ignored rows (label -100): `select_valid=True` (default) first gathers the rows that carry a label, so prompt
tokens and padding cost no LM-head FLOPs (in SFT they are often half the tokens and the LM head is a quarter of a
small model's FLOPs). The price is one host sync (`nonzero` has a data-dependent size) per step, at the end of the
forward when the GPU queue is full anyway. `select_valid=False` computes every row and masks instead: no sync and
static shapes (compile/CUDA-graph friendly), more FLOPs.

FP8 (`fp8=True`, `precision.fp8_lm_head`): a frozen LM head's two GEMMs run on FP8 tensor cores through ops/fp8.py:
h_c rowwise e4m3 against the head's e4m3 row codes for the logits, dlogits rowwise e5m2 against its transposed codes
for grad_h; both orientations are quantized once and cached (~2 x 0.6 GB for Qwen3-8B's 151,936 x 4,096 head). The
softmax and the loss stay fp32 on the bf16 logits the FP8 GEMM returns.

Measured (H100, torch 2.11, N=16384 rows, H=4096, V=151936, bf16, half the rows ignored, frozen head, fwd+bwd):
naive `F.cross_entropy(h @ W.T)` 95 ms / +27.7 GiB peak; this function 37 ms / +1.4 GiB (chunk 1024, Inductor-fused
chunk math; 56 ms with the eager chunk math); select_valid=False 76 ms. Since then the chunk math is the Triton
kernel: 348 us per [1024, 151936] chunk against Inductor's 1074 us (benchmarks/NOTES.md, session 6).
"""

from __future__ import annotations

import torch

from ops.cross_entropy import ce_chunk_, ce_chunk_reference

__all__ = ["chunked_lm_loss", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _head_gemms(weight: torch.Tensor, fp8: bool):
    """(logits of h, grad_h of dlogits): h @ W^T and dlogits @ W, in the activation dtype or on FP8 tensor cores."""
    if not fp8:
        return (lambda h: h @ weight.T), (lambda d: d @ weight)
    from ops.fp8 import E5M2, cached_fp8_weight, fp8_base_forward, fp8_base_grad_input

    if weight.requires_grad:
        raise ValueError("fp8_lm_head needs a frozen LM head (its FP8 codes are cached): do not train lm_head")
    fw = cached_fp8_weight([weight], transposed=True)
    return (lambda h: fp8_base_forward(h, fw)), (lambda d: fp8_base_grad_input(d, fw, "fp8", E5M2))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int, fp8: bool):
        # hidden: [N, H]; weight: [V, H]; labels: [N] with IGNORE_INDEX on rows without a target.
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # the Triton kernel in eager (the usual case: the loss runs outside the compiled blocks); under compile, torch
        ce = ce_chunk_ if hidden.is_cuda and not torch.compiler.is_compiling() else ce_chunk_reference
        logits_of, grad_h_of = _head_gemms(weight, fp8)
        losses, grad_h_chunks = [], []
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_dw else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            valid = y != IGNORE_INDEX
            loss, dlogits = ce(logits_of(h), torch.where(valid, y, 0)[:, None], valid)
            losses.append(loss)
            if need_dh:
                grad_h_chunks.append(grad_h_of(dlogits))
            if need_dw:
                grad_w = grad_w + (dlogits.T @ h).float()
        # Out-of-place accumulation (lists, then one sum / cat): writing chunks into a preallocated grad buffer
        # came back as zeros under torch.compile on torch 2.11 (tests/test_loss.py::test_compiles).
        loss = torch.stack(losses).sum() if losses else hidden.new_zeros((), dtype=torch.float32)
        grad_h = (torch.cat(grad_h_chunks) if grad_h_chunks else torch.zeros_like(hidden)) if need_dh else None
        n_valid = (labels != IGNORE_INDEX).sum()
        ctx.mark_non_differentiable(n_valid)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return loss, n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_n):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def chunked_lm_loss(
    hidden: torch.Tensor,  # [N, H] final-norm hidden states
    weight: torch.Tensor,  # [V, H] LM head (frozen or trainable)
    labels: torch.Tensor,  # [N] next-token targets, IGNORE_INDEX where there is none
    chunk_size: int = 1024,
    select_valid: bool = True,
    fp8: bool = False,  # the LM head's GEMMs on FP8 tensor cores (frozen head; see the module docstring)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies (fp32 scalar) and the number of labelled tokens (int64 scalar tensor).

    Equals `F.cross_entropy(hidden @ weight.T, labels, reduction="sum", ignore_index=-100)`; divide by the token
    count of the whole (accumulated) batch for the mean. See the module docstring for `select_valid`.
    """
    if hidden.ndim != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H] and labels [N], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if select_valid:
        idx = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)  # host sync, see the module docstring
        hidden, labels = hidden.index_select(0, idx), labels.index_select(0, idx)
    loss, n_valid = _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, fp8)
    return loss, n_valid
