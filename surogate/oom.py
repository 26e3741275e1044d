"""CUDA out of memory: say what was measured, what the job roughly needs and what to change; optionally retry.

`oom_message` is printed instead of a traceback: the measured peak, a rough estimate of the need (weights + LoRA
state + saved activations + the loss chunk; for orientation, not a guarantee: on one H100, micro batch 2 x 2048,
benchmarks/NOTES.md measured 36.5-38.6 GiB for qwen3-8b and 7.7-9.7 GiB for qwen3-0.6b, estimated 37.3 and 7.6) and
concrete options: a smaller micro batch with more accumulation (same global batch), `recompute=true`, a q* recipe
storing the base in fewer bytes (FP8, NVFP4 or NF4).

With `oom_retry=true`, `train_with_oom_retry` catches the error at the trainer, drops the partial gradients and
retries the same optimizer step with the micro batch halved and the accumulation doubled. The data position is
exact: `surogate.data.batches` hands out rows in permutation order, so micro-batch k of size B is micro-batches
2k, 2k+1 of size B/2, and the token-weighted loss of a step does not depend on how its window is split.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any

import torch

__all__ = [
    "estimate_memory_gib",
    "prefer_expandable_segments",
    "oom_message",
    "rescale_data_position",
    "shrink_micro_batch",
    "train_with_oom_retry",
]

log = logging.getLogger("surogate")
LOSS_CHUNK_ROWS = 1024  # surogate/loss.py's chunk: one chunk of fp32 logits (+ its gradient) is live at a time


def _moe_layers(args: Any) -> int:
    if not getattr(args, "num_experts", 0):
        return 0
    return sum(args.is_moe_layer(i) for i in range(args.num_layers))


def _expert_params(args: Any) -> int:
    return _moe_layers(args) * args.num_experts * 3 * args.hidden_size * args.moe_intermediate_size


def _params(args: Any) -> tuple[int, int]:
    """(all parameters, parameters of the LoRA-targetable linears) of a ModelArgs. A Qwen3-MoE layer's MLP is its
    experts' stacks (targetable, and quantized by the q* recipes) plus the router (neither)."""
    h, inter, q, kv = args.hidden_size, args.intermediate_size, args.num_heads * args.head_dim, args.num_kv_heads
    kv *= args.head_dim
    moe = _moe_layers(args)
    experts = _expert_params(args)
    linears = args.num_layers * (h * q + 2 * h * kv + q * h) + (args.num_layers - moe) * 3 * h * inter + experts
    router = moe * args.num_experts * h if moe else 0
    embed = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    return linears + embed + router + args.num_layers * 2 * h + h, linears


def prefer_expandable_segments() -> None:
    """Ask the CUDA caching allocator for expandable segments unless the user set PYTORCH_CUDA_ALLOC_CONF.

    Call before the first CUDA allocation. Why: blocks of fixed-size segments fragment when a step's large, short-lived
    buffers (MoE routing, dequantized expert stacks, loss chunks) come and go. Measured on an H100 (2026-11-26):
    Qwen3-30B-A3B qfp8 ran out of memory with 20 GiB reserved but unallocated, and ran at 11.4k tokens/s in 64.6 GiB
    with expandable segments; Qwen3-0.6B and -8B bf16 (CUDA graphs on) kept their speed (81.5k vs 81.8k, 14.84k vs
    14.82k tokens/s) and 8B reserved 36.6 instead of 43.5 GiB.
    """
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def estimate_memory_gib(args: Any, cfg: Any, dtype_bytes: int) -> dict[str, float]:
    """A rough per-device memory need, in GiB, by part (weights, lora, activations, loss) plus `total`."""
    total_params, linear_params = _params(args)
    weight_bytes = total_params * dtype_bytes
    stored = getattr(getattr(cfg, "precision", None), "weights", "bf16")
    if stored == "fp8":
        weight_bytes -= linear_params * (dtype_bytes - 1)  # qfp8 stores the targeted linears as 1-byte codes
    elif stored == "nf4":
        weight_bytes -= linear_params * (dtype_bytes - 0.516)  # qnf4: 4-bit codes + double-quantized absmax
    elif stored == "fp4":  # qfp4 (nvfp4): 4-bit codes + e4m3 per 16; expert stacks stay in the activation dtype
        weight_bytes -= (linear_params - _expert_params(args)) * (dtype_bytes - 0.5625)
    # LoRA A and B of every targeted linear (and of every expert), fp32 master + grad + two AdamW moments.
    h, inter = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    moe = _moe_layers(args)
    mlp_lora = (args.num_layers - moe) * 3 * (h + inter)
    if moe:
        mlp_lora += moe * args.num_experts * 3 * (h + args.moe_intermediate_size)
    lora_bytes = cfg.lora_rank * (args.num_layers * (4 * h + 2 * q + 2 * kv) + mlp_lora) * 4 * 4
    # Saved activations per token and layer, in elements: norms and residuals, q/k/v/attention out, the MLP's
    # gate/up/activation (what a block's backward needs; LoRA intermediates are rank-sized and ignored). An MoE
    # layer keeps, per routed slot (k per token), the gathered input and the weighted output (h each) and the
    # expert's gate/up/activation, plus the router's probabilities.
    tokens = cfg.per_device_train_batch_size * cfg.sequence_len
    attn = 6 * h + 2 * q + 2 * kv
    dense_mlp = 3 * inter
    moe_mlp = args.num_experts_per_tok * (2 * h + 3 * args.moe_intermediate_size) + args.num_experts if moe else 0
    per_token_all_layers = args.num_layers * attn + (args.num_layers - moe) * dense_mlp + moe * moe_mlp
    if getattr(cfg, "recompute", False):  # block inputs (and saves) are kept, plus one block's worth in its backward
        layers = args.num_layers
        ckpt = layers if getattr(cfg, "recompute_layers", None) is None else min(cfg.recompute_layers, layers)
        whole = per_token_all_layers * (layers - ckpt) / layers  # blocks left out of checkpointing keep everything
        saves = getattr(cfg, "recompute_saves", ())  # selective checkpointing (surogate/recompute.py)
        kept = ("residual" in saves) * h + ("attention" in saves) * q  # lora_xa is rank-sized: ignored
        act_elems = tokens * (ckpt * (h + kept) + whole + attn + max(dense_mlp, moe_mlp))
    else:
        act_elems = tokens * per_token_all_layers
    act_bytes = act_elems * dtype_bytes
    loss_bytes = min(tokens, LOSS_CHUNK_ROWS) * args.vocab_size * 4 * 3  # fp32 logits, softmax, grad of one chunk
    parts = {"weights": weight_bytes, "lora": lora_bytes, "activations": act_bytes, "loss": loss_bytes}
    gib = {k: v / 2**30 for k, v in parts.items()}
    gib["total"] = sum(gib.values())
    return gib


# The storage recipes, by bytes per targeted base weight (bf16: 2): what to suggest is the first that stores less
# than the current recipe (one suggestion, the least lossy that helps).
_Q_RECIPES = (
    ("qfp8", 1.0, "base weights stored in FP8, about half the bytes; needs an FP8 GPU"),
    ("qfp4", 0.5625, "base weights stored in NVFP4, about 0.28x the bytes"),
    ("qnf4", 0.516, "base weights stored in NF4 (QLoRA), about 0.26x the bytes"),
)


def _smaller_storage_recipe(recipe: str) -> tuple[str, str] | None:
    from surogate.config import available_recipes

    current = next((b for name, b, _ in _Q_RECIPES if name == recipe), 2.0)
    available = set(available_recipes())
    return next(((n, why) for n, b, why in _Q_RECIPES if b < current and n in available), None)


def oom_message(cfg: Any, args: Any, device: torch.device, dtype_bytes: int, retried: bool = False) -> str:
    """One paragraph: measured peak, estimated need, and the options that lower memory for this configuration."""
    peak = total = None
    if device.type == "cuda" and torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
    measured = f"peak allocated {peak:.1f} GiB of {total:.1f} GiB" if peak is not None else "peak not measured"
    need = ""
    if args is not None:
        est = estimate_memory_gib(args, cfg, dtype_bytes)
        need = (
            f"; estimated need ~{est['total']:.1f} GiB (weights {est['weights']:.1f}, activations "
            f"{est['activations']:.1f}, LoRA+optimizer {est['lora']:.2f}, loss chunk {est['loss']:.1f})"
        )
    bs, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    options = []
    if bs > 1:
        options.append(
            f"per_device_train_batch_size={bs // 2} gradient_accumulation_steps={ga * 2} (same global batch)"
            + ("" if getattr(cfg, "oom_retry", False) else ", or oom_retry=true to do this automatically")
        )
    else:
        options.append(f"a shorter sequence_len (now {cfg.sequence_len})")
    if not cfg.recompute:
        options.append("recompute=true (activation checkpointing: much less activation memory, ~20% slower)")
    elif getattr(cfg, "recompute_layers", None) is not None:
        options.append(
            f"a larger recompute_layers (now {cfg.recompute_layers}; null checkpoints every block), each block "
            "checkpointed frees its activations"
        )
    elif getattr(cfg, "recompute_saves", ()):
        options.append(
            "recompute_saves=[] (plain checkpointing: each block keeps only its input, not also "
            f"{'+'.join(cfg.recompute_saves)})"
        )
    precision = getattr(cfg, "precision", None)
    if (
        getattr(precision, "weights", None) == "bf16"
        and getattr(precision, "compute", None) == "fp8"
        and getattr(precision, "fp8_cache_transposed", "auto") != "false"
    ):
        options.append(
            "precision.fp8_cache_transposed=false (keeps one FP8 copy of each base weight, not also its transposed "
            "codes: 1 byte per weight less, up to ~3% slower)"
        )
    smaller = _smaller_storage_recipe(cfg.recipe)
    if smaller is not None:
        options.append(f"recipe={smaller[0]} ({smaller[1]})")
    head = "CUDA out of memory" + (" (after halving the micro batch down to 1)" if retried else "")
    return f"{head}: {measured}{need}. Options: " + "; ".join(options)


def shrink_micro_batch(cfg: Any) -> int | None:
    """Halve (at least) cfg's micro batch, multiplying the accumulation by the same factor; returns the factor, or
    None when the micro batch is already 1."""
    bs = cfg.per_device_train_batch_size
    if bs <= 1:
        return None
    new = max(d for d in range(1, bs // 2 + 1) if bs % d == 0)  # largest divisor <= bs/2: the global batch stays
    factor = bs // new
    cfg.per_device_train_batch_size = new
    cfg.gradient_accumulation_steps *= factor
    return factor


def train_with_oom_retry(trainer: Any, cfg: Any) -> None:
    """`trainer.train()`, retrying a step that ran out of CUDA memory with a smaller micro batch when
    `cfg.oom_retry` is set (the same global batch and data position; see the module docstring)."""
    while True:
        try:
            trainer.train()
            return
        except torch.OutOfMemoryError:
            if not getattr(cfg, "oom_retry", False) or cfg.per_device_train_batch_size <= 1:
                raise
        # Outside the except block: the traceback (and the tensors its frames hold) is gone, so memory can be freed.
        epoch, micro_step = trainer.window_start
        factor = shrink_micro_batch(cfg)
        trainer.optimizer.zero_grad(set_to_none=True)
        if getattr(trainer, "micro_step", None) is not None:  # a CUDA graph holds the old shapes: capture anew
            trainer.micro_step = type(trainer.micro_step)(trainer.model)
        trainer.state.epoch, trainer.state.micro_step = epoch, micro_step * factor
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            trainer.config_dict[key] = getattr(cfg, key)  # checkpoints record what actually ran
        gc.collect()
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(trainer.device)
        print(
            f"CUDA out of memory at step {trainer.state.step + 1}: retrying with per_device_train_batch_size="
            f"{cfg.per_device_train_batch_size} gradient_accumulation_steps={cfg.gradient_accumulation_steps} "
            "(same global batch)",
            file=sys.stderr,
            flush=True,
        )


def rescale_data_position(state: Any, saved_config: dict, batch_size: int) -> None:
    """A checkpoint counts its data position in micro-batches of the batch size it ran with (smaller after an
    oom_retry); express it in `batch_size` rows when resuming with another micro batch, when that is exact."""
    saved = saved_config.get("per_device_train_batch_size", batch_size)
    if saved == batch_size:
        return
    rows = state.micro_step * saved
    if rows % batch_size:
        log.warning(
            "the checkpoint ran with per_device_train_batch_size=%d; resuming with %d cannot start at its exact data "
            "position (row %d of the epoch): pass per_device_train_batch_size=%d to continue the same curve",
            saved,
            batch_size,
            rows,
            saved,
        )
    state.micro_step = rows // batch_size
