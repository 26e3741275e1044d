"""LoRA linear: frozen base GEMM plus rank-r update, as one opaque op (`torch.ops.surogate.lora_linear`).

Why an op at all: the eager LoRA module (`surogate/lora.py`) is four GEMMs and three pointwise ops that autograd and
Inductor see one by one. Written as one op we control what the forward saves (the LoRA input and the [N, r] product
`x A^T`, never the base output), that the backward never forms a gradient for the frozen weight, and that the two
dX contributions accumulate in one buffer (`dx = dxa A; dx += dy W`, the base GEMM adding onto the rank-r product in
its epilogue: no extra [N, in] pass).

Why lists: one op serves a single projection and a *group* of projections that read the same input (q/k/v,
gate/up). For a group the base weights are concatenated ([sum out, in], prepared once, see `frozen_concat`) so the
input is read by one GEMM, and the LoRA-A matrices are concatenated ([sum r, in]) so `x A^T` is one GEMM too. The
per-projection B products are one small GEMM each, accumulated in place into that projection's column block of the
output (no block-diagonal B is built: that cost a zeros and a copy per block on every call). The op returns the
concatenated output; the graph splits it (custom ops may not return outputs that alias each other).

Without B (`lora_Bs` empty) the op is the base GEMM plus x A^T, and xa is a differentiable output: a consumer that
applies s xa B^T itself (`ops.swiglu_lora`, fused into SwiGLU by `compile_passes/swiglu_lora_fusion.py`) sends the
op the gradient of xa, which takes the place of `dy B` in the backward.

With `xa_tail=True` (B-less, shared input, one A: `compile_passes/lora_xa_tail.py`) the op returns [y | xa] as one
tensor [N, sum out + r] and an empty xa [N, 0]; the consumer reads xa from y's last columns and sends back the
gradient [dy | dxa] as one tensor. When the group's weights were packed with r spare rows after them
(`pack_frozen_weights(..., spare_rows=r)`), A is copied into those rows and the forward is one GEMM against [W; A]
(x is read once; no skinny `x A^T` GEMM) and the backward's dX one GEMM of [dy | dxa] against it (the LoRA dX is
part of the reduction instead of a rank-r pass over dx afterwards). Otherwise the same two GEMMs as before write
into the columns of one buffer.

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

Kernels: cuBLAS through `torch.mm`/`addmm_` (also the CPU path), except the in-place rank-r update of the base
output (the LoRA term): on CUDA a Triton kernel (`add_low_rank_`), because cuBLAS streams the output only at ~2 TB/s
when the inner dimension is 16-48. The LoRA dX needs no such pass: `_grad_x_with_lora`. Another
kernel can replace `_lora_forward` or `_lora_backward` for a device/dtype where it measurably wins; nothing outside
those two functions would change.
`lora_linear_reference` is the plain-torch definition the op is tested against.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from ops.compile_ahead import OpCounts, on_worker
from ops.low_rank_add import add_low_rank_, mm_scaled

__all__ = [
    "FrozenWeightCache",
    "lora_linear",
    "lora_linear_reference",
    "lora_saved_inputs",
    "frozen_concat",
    "mark_xa_non_differentiable",
    "xa_or_its_grad",
    "pack_frozen_weights",
    "clear_frozen_concat_cache",
    "set_frozen_concat_cache",
]


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
_CONCAT_CACHING = True  # off while FSDP shards the base weights: see set_frozen_concat_cache


def set_frozen_concat_cache(enabled: bool) -> None:
    """Cache non-adjacent concatenations (default) or concatenate per call (`enabled=False`).

    With the frozen base sharded by FSDP2 (`surogate.distributed`, shard_base_weights) every all-gather writes the
    group's weights into fresh, separate allocations, so a cache keyed by address would miss every step and keep
    growing. Per-call concatenation then costs one transient copy of the group per op call, never a leak.
    """
    global _CONCAT_CACHING
    _CONCAT_CACHING = enabled
    if not enabled:
        clear_frozen_concat_cache()


def _adjacent_view(weights: Sequence[Tensor]) -> Tensor | None:
    """The weights as one [sum out, in] view when they already lie back to back in one storage (zero copy).

    This runs on every call (it is the hot path once `pack_frozen_weights` has run), so it is a plain loop over
    cheap tensor attributes. Adjacent addresses alone are not enough (two allocations may happen to touch), so the
    first weight's storage must also cover all the rows: then every weight's memory lies inside that storage.
    """
    first = weights[0]
    n_rows = first.shape[0]
    if not n_rows or not first.is_contiguous():
        return None
    dtype, row_shape, row_stride = first.dtype, first.shape[1:], first.stride()[1:]
    row_numel = first.numel() // n_rows
    row_bytes = row_numel * first.element_size()
    ptr = first.data_ptr()
    rows = 0
    for w in weights:
        if w.data_ptr() != ptr + rows * row_bytes or w.dtype != dtype or w.shape[1:] != row_shape:
            return None
        if not w.is_contiguous():
            return None
        rows += w.shape[0]
    if (first.storage_offset() + rows * row_numel) * first.element_size() > first.untyped_storage().nbytes():
        return None
    return first.as_strided((rows, *row_shape), (row_numel, *row_stride))


def _weight_key(w: Tensor) -> tuple:
    # _version changes on any in-place write (load_state_dict, copy_, merge), so a modified weight misses.
    return (w.data_ptr(), w._version, w.shape, w.stride(), w.dtype, w.device)


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
    if not _CONCAT_CACHING or on_worker():  # a compile-ahead worker's meta tensors stay out of the cache
        return torch.cat([w.detach() for w in weights], dim=0)
    key = tuple(map(_weight_key, weights))
    with _CONCAT_LOCK:
        hit = _CONCAT_CACHE.get(key)
        if hit is not None and not any(ref.expired() for ref in hit[0]):
            return hit[1]
        _drop_dead_entries()
        fused = torch.cat([w.detach() for w in weights], dim=0)
        _CONCAT_CACHE[key] = ([StorageWeakRef(w.untyped_storage()) for w in weights], fused)
        return fused


def pack_frozen_weights(weights: Sequence[Tensor], spare_rows: int = 0) -> Tensor:
    """Re-home frozen weights (e.g. q/k/v of one block) into one [sum out, in] storage, in place, before compile.

    Optional: after it `frozen_concat` is a zero-copy view and the cache holds nothing, saving one copy of every
    fused group (~9 GB for Qwen3-8B in bf16). The parameters stay separate `nn.Parameter`s (same objects, same
    state-dict keys); only their storage is shared, so call it after loading and before compiling. Savers that
    refuse shared storage (safetensors) need `.contiguous()` copies; FSDP re-homes parameters anyway.
    `spare_rows` more rows follow the weights in the storage: the op writes the group's LoRA A there (`xa_tail`).
    """
    if any(w.requires_grad for w in weights):
        raise ValueError("pack_frozen_weights is for frozen weights only")
    packed = torch.cat([w.detach() for w in weights] + [weights[0].new_zeros(spare_rows, *weights[0].shape[1:])])
    offset = 0
    for w in weights:
        w.data = packed[offset : offset + w.shape[0]]
        offset += w.shape[0]
    if spare_rows:  # only rows registered here are ever written: other storages may hold live data past a group
        tail = packed[offset:]
        _SPARE_ROWS[tail.data_ptr()] = (StorageWeakRef(tail.untyped_storage()), spare_rows)
    return packed[:offset]


_SPARE_ROWS: dict[int, tuple[StorageWeakRef, int]] = {}  # address after a packed group -> (its storage, spare rows)
_TAIL_HOLDS: dict[int, tuple[int, int]] = {}  # packed group's address -> (address, version) of the A last copied in
stats = OpCounts()  # "weight_tail_gemms": GEMMs run against [W; A] (xa_tail, packed weights); "..._copies"


def weight_with_tail(weights: Sequence[Tensor], lora_A: Tensor, reuse: bool = False) -> Tensor | None:
    """[W_1; ...; W_n; A] as one view of the weights' packed storage with A copied into its spare rows, or None when
    the weights were not packed with room for A (or A's dtype differs): see `xa_tail` in the module docstring.

    `reuse` (the backward): skip the copy when the rows already hold this very A, i.e. the last copy into them was
    of this tensor at this version (its forward's). Each forward copies, so another forward of the group in
    between (a different live A: another address) makes the backward copy again. Under a CUDA graph the check runs
    once, at capture, where the forward's copy has just been made; every replay repeats that copy. Saves a copy
    (~2 us plus a launch) per group and micro-step."""
    view = _adjacent_view(weights) if len(weights) > 1 else None
    if view is None or lora_A.dtype != view.dtype or lora_A.shape[1:] != view.shape[1:]:
        return None
    spare = _SPARE_ROWS.get(view.data_ptr() + view.shape[0] * view.stride(0) * view.element_size())
    if spare is None or spare[0].expired() or spare[1] < lora_A.shape[0]:
        return None
    # A tensor of its own over that memory: a write through a view of the weights would bump their autograd version
    # counter, and anything that saved them for its backward (another op, an eager reference) would then refuse.
    shape = (view.shape[0] + lora_A.shape[0], *view.shape[1:])
    full = view.new_empty(0).set_(view.untyped_storage(), view.storage_offset(), shape, view.stride())
    held = (lora_A.data_ptr(), lora_A._version)
    if not (reuse and _TAIL_HOLDS.get(full.data_ptr()) == held):
        # An elementwise kernel, not copy_: a same-dtype copy_ is a cudaMemcpy, and in a CUDA graph that memcpy node
        # cost ~7.4 us between two GEMMs against ~2.4 for a kernel (H100, benchmarks/NOTES.md). x * 1 is exact.
        with torch.no_grad():
            torch.mul(lora_A, 1, out=full[view.shape[0] :])
        _TAIL_HOLDS[full.data_ptr()] = held
        stats["weight_tail_copies"] += 1
    stats["weight_tail_gemms"] += 1
    return full


def _drop_dead_entries() -> None:
    dead = [k for k, (refs, _) in _CONCAT_CACHE.items() if any(ref.expired() for ref in refs)]
    for k in dead:
        del _CONCAT_CACHE[k]


def clear_frozen_concat_cache() -> None:
    with _CONCAT_LOCK:
        _CONCAT_CACHE.clear()


class FrozenWeightCache:
    """Values made once from a frozen weight (the fp8 and fp4 recipes' quantized codes), one entry per weight.

    Keyed on the weight's address, shape, stride, dtype and device plus the caller's options, and checked against a
    weak reference to the storage (a freed and reused address misses) and the version counter: an in-place write
    re-makes the value and *replaces* the entry, so a weight never has two cached copies (torch.compile's first run
    bumps parameter versions once). Entries of freed weights are dropped on the next miss.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[int, StorageWeakRef, object]] = {}
        self._lock = threading.RLock()  # `make` may read the cache (ops.fp8: its transposed-codes budget)

    def get(self, w: Tensor, options: tuple, make: Callable[[], object]) -> object:
        if on_worker():  # ops/compile_ahead.py: meta tensors, made only to reach the kernels' launches
            return make()
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w.device, *options)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0] == w._version and not hit[1].expired():
                return hit[2]
            self._entries.pop(key, None)  # stale: gone before `make` runs (its memory, and `values`, no longer hold it)
            for k in [k for k, (_, ref, _) in self._entries.items() if ref.expired()]:
                del self._entries[k]
            value = make()
            self._entries[key] = (w._version, StorageWeakRef(w.untyped_storage()), value)
            return value

    def values(self) -> list:
        """The values of weights still alive."""
        with self._lock:
            return [value for _, ref, value in self._entries.values() if not ref.expired()]

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


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


# Host cost matters as much as FLOPs here: on a small model (Qwen3-0.6B) these GEMMs take a few microseconds on the
# GPU, so every aten op dispatched (and every Python call around it) is time the host can't spend staying ahead.
# Hence: no block-diagonal B (torch.block_diag is a zeros + a copy per block), no dtype casts that are no-ops (A, B
# and x share the activation dtype, or the forward's GEMMs would already have refused them), scales as GEMM alphas,
# per-block GEMMs written straight into column slices of one buffer (out=/addmm_ on a strided slice: cuBLAS and the
# CPU BLAS path take the leading dimension, no copy), and slicing with split() (one call, all views).


def _lora_forward(
    x: Tensor,
    weights: Sequence[Tensor],
    bias: Tensor | None,
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    scalings: Sequence[float],
    lora_inputs: Sequence[Tensor],
    base_linear: Callable[[Tensor], Tensor] | None = None,  # x [N, in] -> fresh x W^T [N, sum out]; default bf16
    xa_tail: bool = False,
) -> tuple[Tensor, Tensor]:
    """`base_linear` replaces the base GEMM (fp8/fp4 operands of a stored weight); `weights` are then unused."""
    in_features = x.shape[-1]
    x2 = x.reshape(-1, in_features)
    if xa_tail:
        y = _forward_xa_tail(x2, weights, lora_As[0])
        return y.view(*x.shape[:-1], y.shape[1]), x2.new_empty(x2.shape[0], 0)
    if base_linear is None:
        y = F.linear(x2, weights[0] if len(weights) == 1 else frozen_concat(weights), bias)  # [N, sum out]
    else:
        y = base_linear(x2)
        if bias is not None:
            y += bias
    if not lora_As:  # the base alone (a consumer applies this projection's LoRA: see `lora_saved_inputs`)
        xa = x2.new_empty(x2.shape[0], 0)
    elif len(lora_As) == 1:
        xl = lora_inputs[0].reshape(-1, in_features) if lora_inputs else x2
        xa = F.linear(xl, lora_As[0])  # [N, r]
        if lora_Bs:  # in place: the LoRA update accumulates into the base output
            add_low_rank_(y, xa, lora_Bs[0].t(), scalings[0])
    else:
        ranks = [a.shape[0] for a in lora_As]
        if lora_inputs:  # dropout: each projection has its own masked input, so one small A GEMM each
            xa = x2.new_empty(x2.shape[0], sum(ranks))
            for xl, a, xa_i in zip(lora_inputs, lora_As, xa.split_with_sizes(ranks, 1)):
                torch.mm(xl.reshape(-1, in_features), a.t(), out=xa_i)
        else:  # shared input: all A's in one GEMM (the cat is [sum r, in], tiny)
            xa = F.linear(x2, torch.cat(lora_As))
        # y_i += s_i xa_i B_i^T, one GEMM per projection into y's column block (the block-diagonal B is never built);
        # none without B (the consumer applies it)
        if lora_Bs:
            outs = [b.shape[0] for b in lora_Bs]
            for y_i, xa_i, b, s in zip(y.split_with_sizes(outs, 1), xa.split_with_sizes(ranks, 1), lora_Bs, scalings):
                add_low_rank_(y_i, xa_i, b.t(), s)
    if x.dim() != 2:
        y = y.view(*x.shape[:-1], y.shape[1])
    return y, xa


def _forward_xa_tail(x2: Tensor, weights: Sequence[Tensor], lora_A: Tensor) -> Tensor:
    """[x W^T | x A^T] [N, sum out + r]: one GEMM against [W; A] if the weights have room for A, else two GEMMs
    writing the two column blocks of one buffer."""
    w_ext = weight_with_tail(weights, lora_A)
    if w_ext is not None:
        return F.linear(x2, w_ext)
    w = frozen_concat(weights)
    y = x2.new_empty(x2.shape[0], w.shape[0] + lora_A.shape[0])
    torch.mm(x2, w.t(), out=y[:, : w.shape[0]])
    torch.mm(x2, lora_A.t(), out=y[:, w.shape[0] :])
    return y


def _grad_x_xa_tail(dy: Tensor, weights: Sequence[Tensor], lora_A: Tensor) -> Tensor:
    """[dy | dxa] [W; A]: the base dX and the LoRA dX in one GEMM (inner size sum out + r), or the base dX GEMM and
    the LoRA dX added in place when the weights have no room for A."""
    w_ext = weight_with_tail(weights, lora_A, reuse=True)  # the forward copied this A
    if w_ext is not None:
        return torch.mm(dy, w_ext)
    w = frozen_concat(weights)
    return _grad_x_with_lora(dy[:, : w.shape[0]], w, dy[:, w.shape[0] :], lora_A)


def _grad_x_with_lora(dy: Tensor, w: Tensor, dxa: Tensor, lora_A: Tensor) -> Tensor:
    """dy W + dxa A [N, in]: the rank-r product first, then the base dX GEMM adds onto it (cuBLAS's beta = 1: the
    accumulator is read in the GEMM's epilogue). The other order, the base GEMM and then a pass of the rank-r update
    over its output, took 12-17 us more per call at Qwen3-4B/8B o-projection shapes (H100, benchmarks/NOTES.md)."""
    return torch.mm(dxa, lora_A).addmm_(dy, w)


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
    base_grad_x: Callable[[Tensor], Tensor] | None = None,  # dy [N, sum out] -> fresh [N, in]; default dy W
    xa_tail: bool = False,  # grad_y is [dy | dxa] (the forward ran with xa_tail)
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Returns (grad_x or empty, grad_A_cat [sum r, in], grad_B_full [sum out, sum r], grad_lora_inputs).

    `base_grad_x` replaces the base dX GEMM (fp4: quantized operands); `weights` then only give the input width.
    With no `lora_Bs` (the op ran without B: see the module docstring) `xa` is the gradient of the op's xa output
    and grad_B_full is empty.

    dA and dB come back as one tensor each, not one per projection: an op's outputs may not alias each other, so
    per-projection outputs would cost a copy each. The autograd formula hands out views (`_split_grads`): dA_i is
    row block i of grad_A_cat, dB_i the diagonal block (i, i) of grad_B_full = s * dy^T xa, which one GEMM gives
    for every projection at once. Its off-diagonal blocks are wasted FLOPs: sum_r / in of the base dX GEMM (q/k/v,
    r=16: 48/1024 on Qwen3-0.6B, 48/4096 on 8B) against one GEMM launch instead of one per projection.
    """
    dy = grad_y.reshape(-1, grad_y.shape[-1])
    n = len(lora_As)
    in_features = weights[0].shape[1]
    ranks = [a.shape[0] for a in lora_As]
    if xa_tail:
        dxa = dy[:, sum(w.shape[0] for w in weights) :]
        grad_a = torch.mm(dxa.t(), lora_inputs[0].reshape(-1, in_features))
        grad_b = dxa.new_empty(0, sum(ranks))
        if not needs_grad_x:
            return grad_y.new_empty(0), grad_a, grad_b, []
        return _grad_x_xa_tail(dy, weights, lora_As[0]).view(*grad_y.shape[:-1], in_features), grad_a, grad_b, []
    if not lora_Bs:  # B applied by the consumer (`ops.swiglu_lora`): `xa` holds the gradient of xa, no dB here
        dxa, grad_b = xa, xa.new_empty(0, sum(ranks))
    else:
        dxa, grad_b = _lora_b_grads(dy, xa, lora_Bs, scalings, ranks)
    if not n:  # the base alone
        grad_a = dy.new_empty(0, in_features)
    elif shared_input:
        x2 = lora_inputs[0].reshape(-1, in_features)
        grad_a = torch.mm(dxa.t(), x2)  # one GEMM for all A's
    elif n == 1:
        grad_a = torch.mm(dxa.t(), lora_inputs[0].reshape(-1, in_features))
    else:
        grad_a = dxa.new_empty(dxa.shape[1], in_features)
        for dxa_i, xl, g_i in zip(dxa.split_with_sizes(ranks, 1), lora_inputs, grad_a.split_with_sizes(ranks, 0)):
            torch.mm(dxa_i.t(), xl.reshape(-1, in_features), out=g_i)
    if not needs_grad_x:
        return grad_y.new_empty(0), grad_a, grad_b, []
    lead = grad_y.shape[:-1]
    if base_grad_x is None:  # [N, in]; no dW, ever
        w = weights[0] if len(weights) == 1 else frozen_concat(weights)
        if n and shared_input:  # the LoRA dX folds into the base dX
            grad_x = _grad_x_with_lora(dy, w, dxa, lora_As[0] if n == 1 else torch.cat(lora_As))
            return grad_x.view(*lead, in_features), grad_a, grad_b, []
        grad_x = torch.mm(dy, w)
    else:
        grad_x = base_grad_x(dy)
    grad_lora_inputs: list[Tensor] = []
    if not n:
        pass
    elif shared_input:
        add_low_rank_(grad_x, dxa, lora_As[0] if n == 1 else torch.cat(lora_As))  # LoRA dX folds into the base dX
    elif n == 1:
        grad_lora_inputs.append(torch.mm(dxa, lora_As[0]).view(*lead, in_features))
    else:
        for dxa_i, a in zip(dxa.split_with_sizes(ranks, 1), lora_As):
            grad_lora_inputs.append(torch.mm(dxa_i, a).view(*lead, in_features))
    return grad_x.view(*lead, in_features), grad_a, grad_b, grad_lora_inputs


def _lora_b_grads(
    dy: Tensor, xa: Tensor, lora_Bs: Sequence[Tensor], scalings: Sequence[float], ranks: list[int]
) -> tuple[Tensor, Tensor]:
    """(dxa = s dy B [N, sum r], grad_B_full = s dy^T xa [sum out, sum r]); see `_lora_backward`."""
    n, s0 = len(lora_Bs), scalings[0]
    outs = [b.shape[0] for b in lora_Bs]
    if n == 1:
        dxa = mm_scaled(dy, lora_Bs[0], s0)  # [N, r]
    else:
        dxa = torch.empty_like(xa)  # [N, sum r]; every column block is written below (beta=0: not read)
        for dxa_i, dy_i, b, s in zip(dxa.split_with_sizes(ranks, 1), dy.split_with_sizes(outs, 1), lora_Bs, scalings):
            dxa_i.addmm_(dy_i, b, beta=0, alpha=s)
    uniform = n == 1 or scalings.count(s0) == n
    grad_b = mm_scaled(dy.t(), xa, s0 if uniform else 1.0)
    if not uniform:  # per-projection scales: scale the diagonal blocks (the only ones used)
        for g_i, r_i, s in zip(grad_b.split_with_sizes(outs, 0), _offsets(ranks), scalings):
            g_i[:, r_i[0] : r_i[1]].mul_(s)
    return dxa, grad_b


def _offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def _split_grads(grad_a: Tensor, grad_b: Tensor, ranks: list[int], outs: list[int]) -> tuple[list, list]:
    """Per-projection dA / dB as views of the backward's concatenated results (see `_lora_backward`); no dB when
    the op had no B (`outs` empty)."""
    if not ranks:
        return [], []
    if not outs:
        return (list(grad_a.split_with_sizes(ranks, 0)) if len(ranks) > 1 else [grad_a]), []
    if len(ranks) == 1:
        return [grad_a], [grad_b]
    grad_As = list(grad_a.split_with_sizes(ranks, 0))
    grad_Bs = [g_i[:, lo:hi] for g_i, (lo, hi) in zip(grad_b.split_with_sizes(outs, 0), _offsets(ranks))]
    return grad_As, grad_Bs


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
    xa_tail: bool = False,
) -> tuple[Tensor, Tensor]:
    """Returns (y [..., sum out], xa [N, sum r]), or with `xa_tail` ([y | xa], [N, 0]). See the module docstring."""
    if xa_tail and (lora_Bs or lora_inputs or bias is not None or len(lora_As) != 1):
        raise ValueError("lora_linear: xa_tail needs one (concatenated) A, no B, no bias and a shared input")
    return _lora_forward(x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, xa_tail=xa_tail)


@lora_linear.register_fake
def _lora_linear_fake(x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs, xa_tail=False):
    n = x.numel() // x.shape[-1]
    out = sum(w.shape[0] for w in weights)
    rank = sum(a.shape[0] for a in lora_As)
    if xa_tail:
        return x.new_empty(*x.shape[:-1], out + rank), x.new_empty(n, 0)
    return x.new_empty(*x.shape[:-1], out), x.new_empty(n, rank)


@torch.library.custom_op("surogate::lora_linear_grad", mutates_args=())
def lora_linear_grad(
    grad_y: Tensor,
    lora_inputs: list[Tensor],
    xa: Tensor,
    weights: list[Tensor],
    lora_As: list[Tensor],
    lora_Bs: list[Tensor],
    scalings: list[float],
    shared_input: bool,
    needs_grad_x: bool,
    xa_tail: bool = False,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Returns (grad_x or empty, grad_A_cat, grad_B_full, grad_lora_inputs (empty if shared_input)).

    Named `lora_linear_grad`, not `lora_linear_backward` (the earlier op, whose outputs were per-projection
    lists): Inductor's on-disk caches key a graph on the forward graph (op names, not their autograd formulas), so
    compiled code cached before the change calls the old name and fails loudly instead of misreading the outputs.
    Clear the cache (or set TORCHINDUCTOR_CACHE_DIR) after changing this op's outputs.
    """
    return _lora_backward(
        grad_y, lora_inputs, xa, weights, lora_As, lora_Bs, scalings, shared_input, needs_grad_x, xa_tail=xa_tail
    )


def lora_grad_fake(
    grad_y: Tensor,
    lora_inputs: Sequence[Tensor],
    lora_As: Sequence[Tensor],
    in_features: int,
    shared: bool,
    needs_x: bool,
    with_b: bool = True,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """The outputs' shapes of every LoRA-linear backward op (this one and the fp8/nf4/fp4 variants): grad_x or an
    empty tensor, grad_A_cat [sum r, in], grad_B_full [sum out, sum r] ([0, sum r] without B), grad_lora_inputs."""
    rank = sum(a.shape[0] for a in lora_As)
    grad_a, grad_b = grad_y.new_empty(rank, in_features), grad_y.new_empty(grad_y.shape[-1] if with_b else 0, rank)
    if not needs_x:
        return grad_y.new_empty(0), grad_a, grad_b, []
    grad_x = grad_y.new_empty(*grad_y.shape[:-1], in_features)
    return grad_x, grad_a, grad_b, [] if shared else [xl.new_empty(xl.shape) for xl in lora_inputs]


@lora_linear_grad.register_fake
def _lora_linear_backward_fake(
    grad_y, lora_inputs, xa, weights, lora_As, lora_Bs, scalings, shared_input, needs_x, xa_tail=False
):
    return lora_grad_fake(grad_y, lora_inputs, lora_As, weights[0].shape[1], shared_input, needs_x, bool(lora_Bs))


def _setup_context(ctx, inputs, output) -> None:
    x, weights, bias, lora_As, lora_Bs, scalings, lora_inputs = inputs[:7]
    ctx.xa_tail = len(inputs) > 7 and bool(inputs[7])
    if any(w.requires_grad for w in weights) or (bias is not None and bias.requires_grad):
        raise RuntimeError(
            "surogate::lora_linear never computes a base weight/bias gradient; freeze the base linear "
            "(apply_lora does) or do not rewrite this projection"
        )
    ctx.shared_input = not lora_inputs
    ctx.n = len(weights)
    ctx.scalings = scalings
    ctx.ranks = [a.shape[0] for a in lora_As]
    ctx.outs = [b.shape[0] for b in lora_Bs]
    # Saved: the LoRA input(s) and xa ([N, r]); the weights, A and B are inputs anyway (no extra memory).
    saved_inputs = lora_saved_inputs(x, lora_As, lora_inputs)
    ctx.k = len(saved_inputs)
    ctx.save_for_backward(output[1], *saved_inputs, *weights, *lora_As, *lora_Bs)
    mark_xa_non_differentiable(ctx, output, lora_Bs)


def lora_saved_inputs(x: Tensor, lora_As: Sequence[Tensor], lora_inputs: Sequence[Tensor]) -> list[Tensor]:
    """What a LoRA-linear op saves of its input for dA: x (shared input), each dropped input, or nothing when the op
    runs the base alone (no A, no B: `ops.swiglu_lora.swiglu_lora_down` applies the down projection's LoRA and
    computes its dA from the activation it recomputes, so the [tokens, intermediate] input is not kept)."""
    if not lora_As:
        return []
    return list(lora_inputs) if lora_inputs else [x]


def mark_xa_non_differentiable(ctx, output: tuple[Tensor, Tensor], lora_Bs: Sequence[Tensor]) -> None:
    """xa is an auxiliary output, except without B, where the consumer's gradient of it is the op's dxa."""
    if lora_Bs:
        ctx.mark_non_differentiable(output[1])


def xa_or_its_grad(ctx, xa: Tensor, grad_xa: Tensor | None) -> Tensor:
    """What the backward op takes in its `xa` slot: xa itself, or without B the gradient of xa."""
    if ctx.outs:
        return xa
    return torch.zeros_like(xa) if grad_xa is None else grad_xa


def _backward(ctx, grad_y, grad_xa):
    xa, *saved = ctx.saved_tensors
    xa = xa_or_its_grad(ctx, xa, grad_xa)
    n, k, a = ctx.n, ctx.k, len(ctx.ranks)
    lora_inputs, weights, lora_As, lora_Bs = saved[:k], saved[k : k + n], saved[k + n : k + n + a], saved[k + n + a :]
    # needs_input_grad mirrors the inputs' structure: a bool per tensor, a list of bools per tensor list.
    needs_grad_x = ctx.needs_input_grad[0] or any(ctx.needs_input_grad[6])
    grad_x, grad_a, grad_b, grad_lora_inputs = lora_linear_grad(
        grad_y, lora_inputs, xa, weights, lora_As, lora_Bs, ctx.scalings, ctx.shared_input, needs_grad_x, ctx.xa_tail
    )
    grad_As, grad_Bs = _split_grads(grad_a, grad_b, ctx.ranks, ctx.outs)
    if not needs_grad_x:
        grad_x, grad_lora_inputs = None, [None] * (0 if ctx.shared_input else k)
    grads = (grad_x, [None] * n, None, grad_As, grad_Bs, None, grad_lora_inputs, None)  # frozen weights: no gradient
    return grads[: len(ctx.needs_input_grad)]  # one slot per input as passed (xa_tail may be left to its default)


lora_linear.register_autograd(_backward, setup_context=_setup_context)
