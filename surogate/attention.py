"""Causal attention with document isolation for packed rows.

A packed row holds several documents back to back; `position_ids` restart at 0 where a new document starts. A
token may attend to earlier tokens of its own document only. The mask is derived from `position_ids` once per
forward (`build_doc_mask`, outside the blocks) and handed to every block, so the compiled block sees one fixed
input and no Python control flow that depends on the data.

Backends (all take q, k, v as [B, H, S, D] and return [B, H, S, D]; k/v may have fewer heads than q, GQA):

- "sdpa":   `F.scaled_dot_product_attention` with a boolean [B, 1, S, S] block-diagonal causal mask. Works
            everywhere (the CPU path and the numerical reference), but the dense mask is O(S^2) memory and
            the fused flash kernel cannot take an arbitrary mask, so it is the slow path on GPU.
- "flex":   FlexAttention with a document-causal `BlockMask` (built once per forward by `create_block_mask`).
            Skips fully masked 128x128 tiles, so packing costs no wasted FLOPs. GPU only: FlexAttention has no
            CPU backward. Eager FlexAttention is an unfused reference implementation, so outside
            torch.compile we call a compiled copy; inside a compiled block Dynamo traces it directly.
- "varlen": `torch.nn.attention.varlen.varlen_attn` (flash attention over cu_seqlens), when this torch has it.
            Building cu_seqlens from position_ids needs the number of documents on the host: one device sync
            per forward (in `build_doc_mask`, never per block).

`resolve_backend("auto", device)` picks "flex" on CUDA and "sdpa" elsewhere.

Rows that hold one document each (long samples, synthetic data; a padding tail allowed) need no document mask:
the caller passes `position_ids=None` to the model (`one_document_per_row` decides on the host, from the CPU
batch), the mask is None, and every backend runs plain causal attention with the `causal_kernel`:

- "cudnn":  cuDNN's fused attention, ~1.5x flex's rate on Hopper (benchmarks/NOTES.md: 332 vs 223 TFLOP/s fwd+bwd
            at Qwen3-8B shapes); it cannot take a document mask (its ragged form rebuilds its graph on every call),
            so packed rows stay on `backend`.
- "flash4": FlashAttention-4's Hopper kernels (ops/flash_attention.py; the optional `flash-attn-4` package), ~8%
            less time than cuDNN per forward + backward at Qwen3 shapes, +0.6-1.7% per training step (4B-14B,
            same machine). Its kernels compile in separate processes while the model is built
            (`prepare_causal_kernel`).
- "auto":   flash4 where it can run (the package is installed, a Hopper GPU, head dim 64/96/128) in a single
            process, else cudnn. Under torchrun FlashAttention-4 runs when asked for by name: on 2 H100s (8B bf16)
            it gained only 0.6% per step while its first step took 25 s against 16 (every rank compiles the
            kernels in its own background processes), and more ranks have not been measured.

CPU tensors always take SDPA.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "CAUSAL_KERNELS",
    "VarlenMask",
    "attention",
    "build_doc_mask",
    "one_document_per_row",
    "prepare_causal_kernel",
    "resolve_backend",
    "resolve_causal_kernel",
    "rows_of_one_document",
    "varlen_available",
]

BACKENDS = ("sdpa", "flex", "varlen")
CAUSAL_KERNELS = ("auto", "cudnn", "flash4")


class VarlenMask(NamedTuple):
    cu_seqlens: torch.Tensor  # (num_docs + 1,) int32, offsets into the flattened B*S tokens
    max_seqlen: int  # longest document, a host int (varlen kernels size their grid with it)


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map "auto" to the best backend for `device`; validate explicit names."""
    device = torch.device(device)
    if name == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    if name in ("flex", "varlen") and device.type != "cuda":
        raise ValueError(f"attention backend {name!r} needs a CUDA device (got {device}); use 'sdpa' on CPU")
    if name == "varlen" and not varlen_available():
        raise ValueError(f"attention backend 'varlen' needs torch.nn.attention.varlen (torch {torch.__version__})")
    return name


def resolve_causal_kernel(name: str, device: torch.device | str, head_dim: int) -> str:
    """Validate the kernel of plain causal attention (module docstring) for `device` and `head_dim`, resolving
    "auto". CPU devices run SDPA whatever the name."""
    from ops import flash_attention

    if name not in CAUSAL_KERNELS:
        raise ValueError(f"causal attention kernel must be one of {', '.join(CAUSAL_KERNELS)}; got {name!r}")
    if name == "auto":  # one process only: under torchrun its first step costs more than it gains (docstring)
        one_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
        return "flash4" if one_process and flash_attention.available(device, head_dim) else "cudnn"
    if name == "flash4" and not flash_attention.available(device, head_dim):
        raise ValueError(
            "causal attention kernel 'flash4' needs the flash-attn-4 package (pip install surogate[flash4]), a Hopper "
            f"GPU and head dim 64, 96 or 128 (device {device}, head dim {head_dim}); use 'cudnn'"
        )
    return name


def prepare_causal_kernel(
    kernel: str, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    """Start what the resolved `kernel` needs before its first call, for rows of [batch, seq_len]: FlashAttention-4
    compiles its kernels in background processes (ops/flash_attention.py). Nothing for cuDNN."""
    if kernel == "flash4":
        from ops import flash_attention

        flash_attention.compile_in_background(batch, seq_len, heads, kv_heads, head_dim, dtype)


def one_document_per_row(position_ids: torch.Tensor, labels: torch.Tensor | None = None) -> bool:
    """True when every row of a CPU [B, S] batch is one document at positions 0, 1, ..., optionally followed by a
    tail without labels (the packer's padding): the model may then take `position_ids=None` and run plain causal
    attention. Exact for the loss and every gradient: under a causal mask the document never sees its tail, and the
    tail, which does see the document, carries no loss. Device tensors give False: reading them would stall the host."""
    if position_ids.device.type != "cpu":
        return False
    arange = torch.arange(position_ids.shape[-1])
    for r, row in enumerate(position_ids):
        starts = (row == 0).nonzero().flatten().tolist()
        if starts[:1] != [0] or len(starts) > 2:
            return False
        end = starts[1] if len(starts) == 2 else len(row)
        if not torch.equal(row[:end], arange[:end]):
            return False
        if end < len(row) and (labels is None or bool((labels[r, end:] != -100).any())):
            return False
    return True


def rows_of_one_document(position_ids: torch.Tensor) -> int:
    """How many rows of [rows, S] position ids may run plain causal attention: one document, perhaps followed by a
    padding tail (positions restart at most once). An upper bound on what `one_document_per_row` accepts (it also
    needs the tail to carry no labels), cheap enough for a whole dataset."""
    return int(((position_ids == 0).sum(-1) <= 2).sum())


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] position ids -> [B, S] document index within each row (a new document where position == 0)."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def build_doc_mask(position_ids: torch.Tensor, backend: str):
    """Build the document-causal mask for `backend` once per forward (see the module docstring)."""
    B, S = position_ids.shape
    if backend == "sdpa":
        doc = document_ids(position_ids)
        causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()
        return (doc[:, :, None] == doc[:, None, :]) & causal  # [B, S, S]; broadcast over heads in attention()
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        doc = document_ids(position_ids)

        def document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

        # _compile=True builds the mask tile by tile instead of materializing [B, S, S] booleans.
        return create_block_mask(document_causal, B, None, S, S, device=position_ids.device, _compile=True)
    if backend == "varlen":
        flat = position_ids.reshape(-1)
        starts = flat == 0
        starts[::S] = True  # a row that starts mid-document still starts a sequence: rows never attend across
        idx = torch.nonzero(starts).reshape(-1).to(torch.int32)  # host sync: the number of documents
        cu = torch.cat([idx, idx.new_tensor([flat.numel()])])
        return VarlenMask(cu, int((cu[1:] - cu[:-1]).max()))  # second (tiny) sync, same point in the step
    raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {backend!r}")


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "cudnn") -> torch.Tensor:
    """Plain causal attention (rows of one document) with `kernel` on CUDA. cuDNN's kernel is named directly: SDPA
    would choose FlashAttention-2 (~190 TFLOP/s on an H100 against cuDNN's ~330), and an `sdpa_kernel` priority
    context does not reach the kernel choice inside a compiled graph (the profile still showed FlashAttention). GQA
    k/v go in as they are."""
    if q.device.type == "cuda":
        if kernel == "flash4":
            from ops.flash_attention import flash_causal_attention

            # [B, H, S, D] views of [B, S, H, D] projections: FlashAttention takes those as they are.
            return flash_causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, q.requires_grad, 0.0, True, False)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, backend: str, causal_kernel: str = "cudnn"
) -> torch.Tensor:
    """Document-causal attention. q: [B, Hq, S, D]; k, v: [B, Hkv, S, D] with Hq % Hkv == 0 -> [B, Hq, S, D].
    mask None: one document per row (module docstring), plain causal with `causal_kernel` whatever the backend."""
    if mask is None:
        return causal_attention(q, k, v, causal_kernel)
    gqa = q.shape[1] != k.shape[1]
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
    if backend == "flex":
        if torch.compiler.is_compiling():
            from torch.nn.attention.flex_attention import flex_attention
        else:
            flex_attention = _compiled_flex_attention()
        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        B, H, S, D = q.shape
        # [B, H, S, D] views of [B, S, H, D] projections: transposing back is free.
        qt, kt, vt = (t.transpose(1, 2).reshape(B * S, t.shape[1], D) for t in (q, k, v))
        if gqa:
            kt, vt = (t.repeat_interleave(H // k.shape[1], dim=1) for t in (kt, vt))
        cu, max_len = mask
        out = varlen_attn(qt, kt, vt, cu, cu, max_len, max_len, window_size=(-1, 0))
        return out.reshape(B, S, H, D).transpose(1, 2)
    raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
