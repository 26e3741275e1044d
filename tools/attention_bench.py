"""Attention forward + backward timing at a model's shapes: flex (with kernel options), SDPA backends, FlashAttention-4
(when flash-attn-4 is installed), varlen.

    python tools/attention_bench.py --model qwen3-8b [--docs 1] [--options '{"BLOCK_M": 128, "BLOCK_N": 64}' ...]

Rows are the standard benchmark's (micro batch 2 x 2048); `--docs N` splits each row into N equal documents
(document-causal mask). SDPA rows ignore documents (plain causal): they are the dense ceiling to compare against,
not an equivalent. The varlen rows mask documents as flex does, through FlashAttention's and cuDNN's cu_seqlens
kernels (k/v expanded to the query heads beforehand), and FlashAttention-4's when it is installed (GQA k/v as
they are; also with cu_seqlens padded to a fixed length, the shapes a CUDA graph would need). TFLOP/s counts causal
attention (half of 4*S*S*D per head forward, 2.5x that for backward), for one document per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, iters: int = 10, graph: bool = False) -> float:
    """Seconds per call of `fn`; `graph`: replayed from a CUDA graph, so the host's launch work is not counted (the
    training step runs attention inside one)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def fwd_bwd(attn, q, k, v):
    def run():
        out = attn(q, k, v)
        out.backward(torch.ones_like(out))

    return run


def cu_seqlens(pos: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries of packed rows (position_ids restart at 0) as cumulative lengths over the flattened batch,
    int32 [docs + 1], and the longest document."""
    flat = pos.flatten()
    starts = torch.nonzero(flat == 0).flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])])
    cu = torch.cat([starts.new_zeros(1), ends]).to(torch.int32)
    return cu, int((ends - starts).max())


class _CudnnVarlen(torch.autograd.Function):
    """Document-causal attention through cuDNN's ragged (cu_seqlens) path: q, k, v packed as [tokens, heads, D]."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):
        out, lse, cu_q, cu_k, mq, mk, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
            q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True
        )
        ctx.save_for_backward(q, k, v, out, lse, seed, offset, cu_q, cu_k)
        ctx.max = (mq, mk)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, seed, offset, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
            grad.contiguous(), q, k, v, out, lse, seed, offset, torch.empty(0, device=q.device), cu_q, cu_k,
            *ctx.max, 0.0, True,
        )  # fmt: skip
        return dq, dk, dv, None, None


def add_varlen_rows(add, q, k, v, pos) -> None:
    """Document-causal attention without flex: FlashAttention's and cuDNN's cu_seqlens kernels (rows that error on
    this torch build say so). k and v are expanded to the query heads outside the timed region, so the rows time the
    kernels alone."""
    import inspect

    from torch.nn.attention import varlen

    B, H, S, D = q.shape
    cu, max_len = cu_seqlens(pos)
    rep = H // k.shape[1]

    def packed(t):  # [B, H, S, D] -> [B*S, H, D], a leaf so its gradient is the kernel's own
        return t.detach().transpose(1, 2).reshape(B * S, t.shape[1], D).contiguous().requires_grad_()

    qp, kp, vp = packed(q), packed(k.repeat_interleave(rep, 1)), packed(v.repeat_interleave(rep, 1))
    params = inspect.signature(varlen.varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    add("varlen flash (document-causal)", lambda *_: varlen.varlen_attn(qp, kp, vp, cu, cu, max_len, max_len, **causal))
    add("varlen cudnn (document-causal)", lambda *_: _CudnnVarlen.apply(qp, kp, vp, cu, max_len))
    from ops.flash_attention import available

    if available(q.device, D):  # FlashAttention-4's cu_seqlens kernels take GQA k/v as they are
        from flash_attn.cute.interface import flash_attn_varlen_func

        kg, vg = packed(k), packed(v)

        def flash4(offsets, longest):
            return lambda *_: flash_attn_varlen_func(
                qp, kg, vg, cu_seqlens_q=offsets, cu_seqlens_k=offsets, max_seqlen_q=longest, max_seqlen_k=longest,
                causal=True,
            )[0]  # fmt: skip

        add("varlen flash4 (document-causal)", flash4(cu, max_len))
        # cu_seqlens padded with empty documents to a fixed capacity, and the row length as the longest document:
        # shapes that do not change from batch to batch (a CUDA graph replays them).
        cap = cu.new_full((4 * len(cu),), int(cu[-1]))
        cap[: len(cu)] = cu
        add(f"varlen flash4, {len(cap) - 1} slots, max S (document-causal)", flash4(cap, S))
        # Buckets a graph per bucket could use: slots and the longest document rounded up to powers of two.
        slots = 1 << (len(cu) - 2).bit_length()  # documents: len(cu) - 1
        bucket = cu.new_full((slots + 1,), int(cu[-1]))
        bucket[: len(cu)] = cu
        longest = max(128, 1 << (max_len - 1).bit_length())
        add(f"varlen flash4, {slots} slots, max {longest} (document-causal)", flash4(bucket, longest))


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    from surogate.attention import build_doc_mask
    from surogate.models.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--docs", type=int, default=1)
    p.add_argument("--options", nargs="*", default=[], help="flex kernel_options dicts (JSON) to try")
    p.add_argument("--autotune", action="store_true", help="also flex compiled with max-autotune-no-cudagraphs")
    p.add_argument("--graph", action="store_true", help="time replays of a CUDA graph (kernels only, no host work)")
    cli = p.parse_args()

    a = PRESETS[cli.model]
    B, S, D = cli.batch, cli.seq_len, a.head_dim
    dev = torch.device("cuda")
    q = torch.randn(B, a.num_heads, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, a.num_kv_heads, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    doc_len = S // cli.docs
    pos = (torch.arange(S, device=dev) % doc_len).expand(B, S).contiguous()
    block_mask = build_doc_mask(pos, "flex")
    flops = B * a.num_heads * 2 * S * S * D * 3.5 / cli.docs  # causal fwd (2*S*S*D) + bwd (2.5x)

    rows = []

    def add(name, attn):
        try:
            s = timed(fwd_bwd(attn, q, k, v), graph=cli.graph)
            rows.append((name, f"{s * 1e3:.2f}", f"{flops / s / 1e12:.0f}"))
        except Exception as e:  # a backend that does not apply here is a row, not a crash
            rows.append((name, "error", f"{type(e).__name__}: {str(e)[:80]}"))

    for opts in [None, *[json.loads(o) for o in cli.options]]:
        fn = torch.compile(lambda q, k, v, o=opts: flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True,
                                                                  kernel_options=o))  # fmt: skip
        add(f"flex {json.dumps(opts) if opts else 'default'}", fn)
    if cli.autotune:
        fn = torch.compile(
            lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True),
            mode="max-autotune-no-cudagraphs",
        )
        add("flex max-autotune", fn)
    for name, backend in [("sdpa flash (causal only)", SDPBackend.FLASH_ATTENTION),
                          ("sdpa cudnn (causal only)", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa efficient (causal only)", SDPBackend.EFFICIENT_ATTENTION)]:  # fmt: skip

        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        add(name, sdpa)
    from ops.flash_attention import available, flash_causal_attention

    if available(dev, D):  # our FlashAttention-4 op (attn_causal_kernel=flash4), on the [B, S, H, D] layout it takes
        add("flash4 (causal only)", lambda q, k, v: flash_causal_attention(*(t.transpose(1, 2) for t in (q, k, v))))
    add_varlen_rows(add, q, k, v, pos)
    print(f"\n{cli.model}: B={B} S={S} Hq={a.num_heads} Hkv={a.num_kv_heads} D={D} docs/row={cli.docs}")
    print(f"{'variant':<70} {'ms':>8} {'TFLOP/s':>8}")
    for name, ms, tf in rows:
        print(f"{name:<70} {ms:>8} {tf:>8}")


if __name__ == "__main__":
    main()
