"""Selective activation checkpointing: which of a checkpointed block's tensors are saved instead of recomputed.

`recompute=true` wraps each decoder block in an activation checkpoint: the forward keeps the block's input, and
the backward recomputes what it needs from it. Some of that is expensive to recompute and cheap to keep. A
checkpoint *policy* (torch.utils.checkpoint's selective checkpointing, applied by AOTAutograd's partitioner when
the block is compiled) names the ops whose outputs are saved; everything else is recomputed. `recompute_saves`
picks from:

    lora_xa    the o and down projections' xa = x A^T ([tokens, r], through `surogate::keep`, see
               compile_passes/keep_lora_xa.py). Without it the backward reruns the SwiGLU kernel and o's GEMM
               only to get these. ~0 bytes.
    residual   the residual stream after attention (`surogate::low_rank_add`: o's output + LoRA + residual).
               With lora_xa, o's GEMM is then not recomputed at all. hidden_size x 2 bytes per token and block.
    attention  the attention output and its log-sum-exp: no attention forward in the backward.
               num_heads x head_dim x 2 bytes (+ 4 per head) per token and block.

What is still recomputed: the norms, the q/k/v and gate/up GEMMs and their fused LoRA/RoPE/SwiGLU ops (their
outputs are the big ones). On Qwen3-8B bf16 (2 x 2048 tokens, one H100) the three saves keep 64 MiB per block
(2.25 GiB over 36 blocks) and take the step from 12.7k to 13.5k tokens/s (peak 17.5 -> 19.8 GiB;
benchmarks/NOTES.md). An empty list is plain checkpointing: only the block input is kept.

The residual and lora_xa saves name our ops, so they take effect with the passes on (`use_passes=true`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["RECOMPUTE_SAVES", "checkpoint_block", "checkpoint_policy"]

RECOMPUTE_SAVES = ("lora_xa", "residual", "attention")


def _attention_ops() -> tuple:
    """The attention ops of every backend in surogate/attention.py that this torch has: SDPA's fused kernels,
    FlexAttention's higher-order op, varlen attention's custom op, our FlashAttention-4 op."""
    import ops.flash_attention  # noqa: F401  (registers surogate::flash_causal_fwd; the package itself loads lazily)

    names = (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    found = [getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)]
    found.append(torch.ops.surogate.flash_causal_fwd.default)
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        found.append(flex)
    try:
        from torch.nn.attention import varlen  # noqa: F401  (registers torch_attn::_varlen_attn)

        found.append(torch.ops.torch_attn._varlen_attn.default)
    except (ImportError, AttributeError):
        pass  # a torch without varlen attention: surogate/attention.py does not offer that backend then
    return tuple(found)


def _saved_ops(saves: Sequence[str]) -> frozenset:
    import ops.keep  # noqa: F401  (registers surogate::keep; here, so that the config can import this module cheaply)
    import ops.low_rank_add  # noqa: F401  (registers surogate::low_rank_add)

    unknown = set(saves) - set(RECOMPUTE_SAVES)
    if unknown:
        raise ValueError(f"recompute_saves: unknown {sorted(unknown)}; choose from {list(RECOMPUTE_SAVES)}")
    by_name = {
        "lora_xa": (torch.ops.surogate.keep.default,),
        "residual": (torch.ops.surogate.low_rank_add.default,),
        "attention": _attention_ops(),
    }
    return frozenset(op for name in saves for op in by_name[name])


def checkpoint_policy(saves: Sequence[str]) -> Callable:
    """A selective-checkpoint policy: MUST_SAVE the outputs of the ops `saves` names, recompute the rest."""
    saved = _saved_ops(saves)

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint_block(block: nn.Module, saves: Sequence[str] = RECOMPUTE_SAVES) -> nn.Module:
    """`block` wrapped in an activation checkpoint that keeps what `saves` names (nothing else when empty)."""
    if not saves:
        return checkpoint_wrapper(block)
    context_fn = functools.partial(create_selective_checkpoint_contexts, checkpoint_policy(saves))
    return checkpoint_wrapper(block, context_fn=context_fn)
