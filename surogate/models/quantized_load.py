"""Stream-quantized loading: recipes that store the frozen base quantized (qfp8, qnf4, qfp4) never hold the bf16
model.

Load-then-quantize materializes every weight in bf16 before `parallelize` converts the LoRA bases, so the load peak
is the whole bf16 model (Qwen3-32B: 64 GB, which leaves an 80 GB GPU no room). Here `load_model` hands each decoder
block to a hook as soon as its weights exist (read from the memory-mapped shards, or randomly initialized for a
preset), and the hook converts that block before the next one is read:

    wrap the block's target linears in LoRALinear (adapter left uninitialized)
    -> the recipe's block quantizer (`surogate.parallelize.BLOCK_QUANTIZERS[precision.weights]`: pack q/k/v and
       gate/up, quantize each group, release the bf16 tensors)

so the load peak is the quantized blocks plus one block in bf16 (and the embedding, final norm and LM head, which
stay bf16 as they do after load-then-quantize). Then `apply_lora` on the whole model wraps what is left (blocks the
recipe keeps in bf16: skip_quant_first/last_layers) and initializes every adapter in model order. The result is the
model load-then-quantize builds, code for code and draw for draw: the quantizers are the ones `parallelize` runs
(which then finds nothing left to convert), and the adapters are initialized in the same order from the same
random state (block initialization and block loading draw nothing in between).

A new weight format streams once it registers a per-block quantizer in `BLOCK_QUANTIZERS` (options such as
fp4_format bound by `block_quantizer`); formats without one load in bf16 and are converted by `parallelize`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from surogate.lora import LoRAConfig, apply_lora, wrap_linears
from surogate.models.checkpoint import BlockHook, load_model
from surogate.models.qwen3 import ModelArgs, Qwen3ForCausalLM

__all__ = ["load_lora_model", "stream_quantize_hook"]


def stream_quantize_hook(precision: Any, num_layers: int, lora: LoRAConfig) -> BlockHook | None:
    """The `load_model(on_block=...)` hook that converts each quantized block as it loads; None when the recipe
    stores its base in bf16 (or in a format without a per-block quantizer)."""
    from surogate.parallelize import block_quantizer, quantized_blocks

    quantize = block_quantizer(precision.weights, precision.fp4_format) if precision is not None else None
    if quantize is None:
        return None
    quantized = quantized_blocks(precision, num_layers)

    def on_block(index: int, block: nn.Module) -> None:
        if quantized[index]:
            for p in block.parameters():
                p.requires_grad_(False)  # frozen before packing, as `apply_lora` leaves a load-then-quantize model
            wrap_linears(block, lora, init=False)
            quantize(block)

    return on_block


def load_lora_model(
    path_or_preset: str | Path | ModelArgs,
    device: torch.device | str,
    dtype: torch.dtype,
    lora: LoRAConfig,
    precision: Any = None,
    **load_kwargs: Any,
) -> tuple[Qwen3ForCausalLM, ModelArgs, list[str]]:
    """`load_model` then `apply_lora`, with the bases of the recipe's quantized blocks stream-quantized while
    loading (`precision`: a `surogate.config.PrecisionConfig`, or None for bf16). Returns (model, args, the names
    of the LoRA-wrapped modules). `parallelize` afterwards compiles it exactly as a load-then-wrap model."""
    num_layers = _num_layers(path_or_preset, load_kwargs.get("allow_pickle", False))
    hook = stream_quantize_hook(precision, num_layers, lora)
    model, args = load_model(path_or_preset, device, dtype, on_block=hook, **load_kwargs)
    return model, args, apply_lora(model, lora)


def _num_layers(path_or_preset: str | Path | ModelArgs, allow_pickle: bool) -> int:
    from surogate.models.checkpoint import inspect_checkpoint
    from surogate.models.presets import PRESETS

    if isinstance(path_or_preset, ModelArgs):
        return path_or_preset.num_layers
    if str(path_or_preset) in PRESETS:
        return PRESETS[str(path_or_preset)].num_layers
    return inspect_checkpoint(path_or_preset, allow_pickle).num_layers
