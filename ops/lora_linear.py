"""LoRA linear: frozen base GEMM plus rank-r update, as one opaque op (`torch.ops.surogate.lora_linear`).

Why an op at all: the eager LoRA module (`surogate/lora.py`) is four GEMMs and three pointwise ops that autograd and
Inductor see one by one. Written as one op we control what the forward saves (the LoRA input and the [N, r] product
`x A^T`, never the base output), that the backward never forms a gradient for the frozen weight, and that the two
dX contributions accumulate in place in one buffer (`dx = dy W; dx += dxa A` via `addmm_`, no extra [N, in] pass).

Why lists: one op serves a single projection and a *group* of projections that read the same input (q/k/v,
gate/up). For a group the base weights are concatenated ([sum out, in], prepared once, see `frozen_concat`) so the
input is read by one GEMM, and the LoRA-A matrices are concatenated ([sum r, in]) so `x A^T` is one GEMM too. The
per-projection B products are one GEMM against a block-diagonal B ([sum out, sum r]); r is small, so the zero blocks
cost nothing worth measuring next to the base GEMM. The op returns the concatenated output; the graph splits it
(custom ops may not return outputs that alias each other).

Dropout stays outside the op. `nn.Dropout` in the block becomes an ordinary `dropout` node in the Dynamo graph, so
its RNG is whatever torch.compile does for every other dropout (Inductor's philox stream, or eager's with
`fallback_random`), activation checkpointing replays it as usual, and the op itself is deterministic. The dropped
input arrives as `lora_inputs` (one per projection: each LoRA module draws its own mask, as in eager/PEFT). With no
dropout `lora_inputs` is empty and the LoRA branch reads `x`, which lets the group share one LoRA-A GEMM and lets
the backward fold the LoRA dX into the base dX. The op's gradient for a dropped input flows back through the
dropout node's own backward (mask multiply), as in eager.

Shapes: x [..., in]; weights[i] [out_i, in]; lora_As[i] [r_i, in]; lora_Bs[i] [out_i, r_i]; bias [sum out_i] or
None; outputs y [..., sum out_i] and xa [N, sum r_i] (N = prod of leading dims; xa is an auxiliary output only
so the autograd formula can save it; it is not differentiable).

Dtypes: whatever the graph hands in; the pass keeps eager's `A.to(x.dtype)` casts outside the op, so A and B come
in the activation dtype and their gradients go back in that dtype (the cast node's backward brings them to the
fp32 master dtype, exactly as in eager). dA/dB are always returned in the dtype of A/B as given to the op.

Kernels: cuBLAS through `torch.mm`/`addmm_` (also the CPU path). A Triton kernel can replace `_lora_forward` or
`_lora_backward` for a device/dtype where it measurably wins; nothing outside those two functions would change.
`lora_linear_reference` is the plain-torch definition the op is tested against.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["lora_linear", "lora_linear_reference", "frozen_concat", "pack_frozen_weights", "clear_frozen_concat_cache"]


# ----------------------------------------------------------------------------------------------------------------
# Reference (plain torch, autograd-differentiable): the definition every kernel is tested against.
# ----------------------------------------------------------------------------------------------------------------


def lora_linear_reference(
    x: Tensor,  # [..., in]
    weights: Sequence[Tensor],  # [out_i, in] each, frozen
    bias: Tensor | None,  # [sum out_i]
    lora_As: Sequence[Tensor],  # [r_i, in]
    lora_Bs: Sequence[Tensor],  # [out_i, r_i]
    scalings: Sequence[float],
    lora_inputs: Sequence[Tensor] = (),  # dropped x per projection; empty = x
) -> Tensor:  # [..., sum out_i]
    """Eager LoRA per projection, concatenated: `linear(x, W_i) + s_i * linear(linear(x_i, A_i), B_i)`."""
    outs = []
    for i, (w, a, b, s) in enumerate(zip(weights, lora_As, lora_Bs, scalings, strict=True)):
        x_lora = lora_inputs[i] if lora_inputs else x
        outs.append(F.linear(x, w) + s * F.linear(F.linear(x_lora, a), b))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------------------------
# Frozen weight concatenation, prepared once.
# ----------------------------------------------------------------------------------------------------------------

_CONCAT_CACHE: dict[tuple, tuple[list[StorageWeakRef], Tensor]] = {}
_CONCAT_LOCK = threading.Lock()


def _weight_key(w: Tensor) -> tuple:
    # _version changes on any in-place write (load_state_dict, copy_, merge), so a modified weight misses.
    return (w.data_ptr(), w._version, tuple(w.shape), tuple(w.stride()), w.dtype, w.device)


def _adjacent_view(weights: Sequence[Tensor]) -> Tensor | None:
    """The weights as one [sum out, in] view when they already lie back to back in one storage (zero copy)."""
    first = weights[0]
    if not all(w.is_contiguous() and w.dtype == first.dtype and w.shape[1:] == first.shape[1:] for w in weights):
        return None
    storage_ptr = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for w in weights:
        if w.untyped_storage().data_ptr() != storage_ptr or w.storage_offset() != offset:
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def frozen_concat(weights: Sequence[Tensor]) -> Tensor:
    """`torch.cat(weights)` for frozen weights, computed once and cached (not once per step).

    A zero-copy view when the weights are adjacent in one storage. Otherwise the concatenation is cached, keyed on
    each weight's data_ptr, version counter, shape, stride, dtype and device, and checked against weak references
    to the weights' storages so a freed-and-reallocated address never hits a stale entry. The cache holds one extra
    copy of each fused group's weights (for Qwen3-8B q/k/v + gate/up in bf16: ~9 GB), the price of one GEMM per
    group without changing how the model stores its parameters. Entries whose weights died are dropped on the next
    miss; `clear_frozen_concat_cache()` drops all.
    """
    if len(weights) == 1:
        return weights[0]
    view = _adjacent_view(weights)
    if view is not None:
        return view
    key = tuple(_weight_key(w) for w in weights)
    with _CONCAT_LOCK:
        hit = _CONCAT_CACHE.get(key)
        if hit is not None and all(not ref.expired() for ref in hit[0]):
            return hit[1]
        _drop_dead_entries()
        fused = torch.cat([w.detach() for w in weights], dim=0)
        _CONCAT_CACHE[key] = ([StorageWeakRef(w.untyped_storage()) for w in weights], fused)
        return fused


def pack_frozen_weights(weights: Sequence[Tensor]) -> Tensor:
    """Re-home frozen weights (e.g. q/k/v of one block) into one [sum out, in] storage, in place, before compile.

    Optional: after it `frozen_concat` is a zero-copy view and the cache holds nothing, saving one copy of every
    fused group (~9 GB for Qwen3-8B in bf16). The parameters stay separate `nn.Parameter`s (same objects, same
    state-dict keys); only their storage is shared, so call it after loading and before compiling. Savers that
    refuse shared storage (safetensors) need `.contiguous()` copies; FSDP re-homes parameters anyway.
    """
    if any(w.requires_grad for w in weights):
        raise ValueError("pack_frozen_weights is for frozen weights only")
    packed = torch.cat([w.detach() for w in weights], dim=0)
    offset = 0
    for w in weights:
        w.data = packed[offset : offset + w.shape[0]]
        offset += w.shape[0]
    return packed


def _drop_dead_entries() -> None:
    dead = [k for k, (refs, _) in _CONCAT_CACHE.items() if any(ref.expired() for ref in refs)]
    for k in dead:
        del _CONCAT_CACHE[k]


def clear_frozen_concat_cache() -> None:
    with _CONCAT_LOCK:
        _CONCAT_CACHE.clear()


# ----------------------------------------------------------------------------------------------------------------
# Kernels (cuBLAS via torch; also the CPU path).
# ----------------------------------------------------------------------------------------------------------------


def _block_diag_B(lora_Bs: Sequence[Tensor], scalings: Sequence[float]) -> tuple[Tensor, float]:
    """B blocks on the diagonal of [sum out, sum r], and the scale still to apply (1.0 if folded into the blocks)."""
    if len(set(scalings)) == 1:  # the usual case: one LoRA config; apply the scale as the GEMM's alpha (exact)
        b = lora_Bs[0] if len(lora_Bs) == 1 else torch.block_diag(*lora_Bs)
        return b, float(scalings[0])
    # scale in (at least) fp32, then round once to B's dtype
    scaled = [(b.to(torch.promote_types(b.dtype, torch.float32)) * s).to(b.dtype) for b, s in zip(lora_Bs, scalings)]
    return torch.block_diag(*scaled), 1.0


def _lora_forward(
    x: Tensor,
    weights: Sequence[Tensor],
    bias: Tensor | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    lora_inputs: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    x2 = x.reshape(-1, x.shape[-1])
    if lora_inputs:  # dropout: each projection has its own masked input, so one small A GEMM each
        xa = torch.cat([xl.reshape(-1, xl.shape[-1]) @ a.t() for xl, a in zip(lora_inputs, lora_As)], dim=1)
    else:
        a_cat = lora_As[0] if len(lora_As) == 1 else torch.cat(lora_As, dim=0)
        xa = x2 @ a_cat.t()
    w = frozen_concat(weights)
    y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
    b_blk, alpha = _block_diag_B(lora_Bs, scalings)
    y.addmm_(xa, b_blk.t(), alpha=alpha)  # in place: the LoRA update accumulates into the base output
    return y.view(*x.shape[:-1], y.shape[-1]), xa


def _lora_backward(
    grad_y: Tensor,
    lora_inputs: Sequence[Tensor],
    xa: Tensor,
    weights: Sequence[Tensor],
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    shared_input: bool,
    needs_grad_x: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    dy = grad_y.reshape(-1, grad_y.shape[-1])
    b_blk, alpha = _block_diag_B(lora_Bs, scalings)
    dxa = dy @ b_blk  # [N, sum r]
    if alpha != 1.0:
        dxa.mul_(alpha)
    ranks = [a.shape[0] for a in lora_As]
    outs = [b.shape[0] for b in lora_Bs]
    # dB_i = s_i * dy_i^T (x_i A_i^T): per block, on strided slices (no copies, no wasted off-diagonal blocks).
    grad_Bs = []
    for dy_i, xa_i, b, s in zip(dy.split(outs, dim=1), xa.split(ranks, dim=1), lora_Bs, scalings):
        grad_Bs.append((dy_i.t() @ xa_i).mul_(s).to(b.dtype))
    in_features = weights[0].shape[1]
    if shared_input:
        x2 = lora_inputs[0].reshape(-1, in_features)
        grad_a_cat = dxa.t() @ x2  # one GEMM for all A's
        grad_As = [g.to(a.dtype, copy=True) for g, a in zip(grad_a_cat.split(ranks, dim=0), lora_As)]
    else:
        grad_As = [
            (dxa_i.t() @ xl.reshape(-1, in_features)).to(a.dtype)
            for dxa_i, xl, a in zip(dxa.split(ranks, dim=1), lora_inputs, lora_As)
        ]
    lead = grad_y.shape[:-1]
    if not needs_grad_x:
        return grad_y.new_empty(0), [], grad_As, grad_Bs
    grad_x = dy @ frozen_concat(weights)  # [N, in]; never a gradient for the frozen weight
    grad_lora_inputs: list[Tensor] = []
    if shared_input:
        a_cat = lora_As[0] if len(lora_As) == 1 else torch.cat(lora_As, dim=0)
        grad_x.addmm_(dxa, a_cat)  # the LoRA dX folds into the base dX in place
    else:
        for dxa_i, a in zip(dxa.split(ranks, dim=1), lora_As):
            grad_lora_inputs.append((dxa_i @ a).view(*lead, in_features))
    return grad_x.view(*lead, in_features), grad_lora_inputs, grad_As, grad_Bs


# ----------------------------------------------------------------------------------------------------------------
# Registration: forward op, backward op, fakes, autograd.
# ----------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("surogate::lora_linear", mutates_args=())
def lora_linear(
    x: Tensor,
    weights: list[Tensor],
    bias: Tensor | None,
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    scalings: list[float],
    lora_inputs: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """Returns (y [..., sum out], xa [N, sum r]). See the module docstring."""
    return _lora_forward(x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs)


@lora_linear.register_fake
def _lora_linear_fake(x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs):
    n = x.numel() // x.shape[-1]
    out = sum(w.shape[0] for w in weights)
    rank = sum(a.shape[0] for a in lora_As)
    return x.new_empty(*x.shape[:-1], out), x.new_empty(n, rank)


@torch.library.custom_op("surogate::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grad_y: Tensor,
    lora_inputs: list[Tensor],
    xa: Tensor,
    weights: list[Tensor],
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    scalings: list[float],
    shared_input: bool,
    needs_grad_x: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Returns (grad_x or empty, grad_lora_inputs (empty if shared_input), grad_As, grad_Bs)."""
    return _lora_backward(grad_y, lora_inputs, xa, weights, lora_As, lora_Bs, scalings, shared_input, needs_grad_x)


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(grad_y, lora_inputs, xa, weights, lora_As, lora_Bs, scalings, shared_input, needs_x):
    grad_As = [a.new_empty(a.shape) for a in lora_As]
    grad_Bs = [b.new_empty(b.shape) for b in lora_Bs]
    if not needs_x:
        return grad_y.new_empty(0), [], grad_As, grad_Bs
    grad_x = grad_y.new_empty(*grad_y.shape[:-1], weights[0].shape[1])
    grad_lora_inputs = [] if shared_input else [xl.new_empty(xl.shape) for xl in lora_inputs]
    return grad_x, grad_lora_inputs, grad_As, grad_Bs


def _setup_context(ctx, inputs, output) -> None:
    x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = inputs
    if any(w.requires_grad for w in weights) or (bias is not None and bias.requires_grad):
        raise RuntimeError(
            "surogate::lora_linear never computes a base weight/bias gradient; freeze the base linear "
            "(apply_lora does) or do not rewrite this projection"
        )
    ctx.shared_input = len(lora_inputs) == 0
    ctx.n_weights = len(weights)
    ctx.scalings = list(scalings)
    saved_inputs = [x] if ctx.shared_input else list(lora_inputs)
    # Saved: the LoRA input(s) and xa ([N, r]); the weights, A and B are inputs anyway (no extra memory).
    ctx.save_for_backward(output[1], *saved_inputs, *weights, *lora_As, *lora_Bs)
    ctx.n_inputs = len(saved_inputs)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_xa):
    saved = list(ctx.saved_tensors)
    xa, saved = saved[0], saved[1:]
    k, n = ctx.n_inputs, ctx.n_weights
    lora_inputs, weights, lora_As, lora_Bs = saved[:k], saved[k : k + n], saved[k + n : k + 2 * n], saved[k + 2 * n :]
    # needs_input_grad mirrors the inputs' structure: a bool per tensor, a list of bools per tensor list.
    needs_grad_x = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[6])
    grad_x, grad_lora_inputs, grad_As, grad_Bs = lora_linear_backward(
        grad_y, lora_inputs, xa, weights, lora_As, lora_Bs, ctx.scalings, ctx.shared_input, needs_grad_x
    )
    if not needs_grad_x:
        grad_x, grad_lora_inputs = None, [None] * (0 if ctx.shared_input else k)
    no_grads = [None] * n  # the frozen weights: never a gradient
    return grad_x, no_grads, None, grad_As, grad_Bs, None, grad_lora_inputs


lora_linear.register_autograd(_backward, setup_context=_setup_context)
