"""Turn the eager model into the fast one, block by block, in torchtitan's order.

    activation checkpointing  ->  per-block torch.compile (our backend)  ->  (later) fully_shard

Regional compilation: every decoder block has the same code and shapes, so Dynamo traces one block and reuses the
compiled code for the others (a 64-layer model compiles once, not 64 times). Checkpointing wraps the block *before*
compiling so the compiled region contains the recompute. The LM head + loss stays eager: it is a chunked custom
autograd function of its own (surogate/loss.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from surogate.recompute import RECOMPUTE_SAVES, checkpoint_block

log = logging.getLogger(__name__)


SHARED_INPUT_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def colocate_shared_input_weights(model: nn.Module) -> int:
    """Store each block's q/k/v (and gate/up) frozen weights back to back in one buffer.

    The shared-input fusion pass runs one GEMM against the concatenated weights of a group; when the weights are
    already adjacent in memory that concatenation is a free view (`ops.lora_linear.frozen_concat`) instead of a
    cached copy (~9 GB extra on Qwen3-8B). Each projection keeps its own `weight` parameter (a view), so module
    paths, state-dict keys and the eager reference are unchanged. Returns the number of groups moved.
    """
    return sum(colocate_block(block) for block in model.model.layers)


def colocate_block(block: nn.Module) -> int:
    """`colocate_shared_input_weights` for one decoder block. Idempotent: groups already adjacent, and quantized
    codes (1-byte elements: a stream-quantized block's are packed by its quantizer, NF4 ones need no packing),
    are left alone."""
    from ops.lora_linear import _adjacent_view, pack_frozen_weights

    moved = 0
    for parent_name, names in SHARED_INPUT_GROUPS:
        parent = getattr(block, parent_name)
        modules = [getattr(parent, n, None) for n in names]
        if any(m is None for m in modules):
            continue  # e.g. an MoE block's mlp
        weights = [m.weight for m in modules]
        if any(w.requires_grad or w.device.type == "meta" or w.element_size() < 2 for w in weights):
            continue  # only frozen, materialized, unquantized weights
        if len({(w.dtype, w.device, w.shape[1:]) for w in weights}) != 1 or _adjacent_view(weights) is not None:
            continue
        # room for the group's LoRA A after its weights: the bf16 op's forward and dX then run one GEMM against
        # [W; A] (`xa_tail` in ops/lora_linear.py); a few hundred KB per group
        spare = sum(m.lora_A.shape[0] for m in modules) if all(hasattr(m, "lora_A") for m in modules) else 0
        pack_frozen_weights(weights, spare_rows=spare)
        moved += 1
    return moved


def compile_backend(recipe, use_passes: bool):
    """Our FX passes + Inductor, or Inductor alone (`use_passes=False`: what the passes add is then measurable)."""
    from compile_passes.backend import make_backend

    return make_backend(recipe, passes=use_passes)


def resolve_precision(recipe: str, precision=None):
    """The recipe's precision section (recipes/NAME.yaml) unless given; None for a registry-only recipe name."""
    if precision is not None:
        return precision
    from surogate.config import RECIPES_DIR, canonical_recipe, recipe_precision

    return recipe_precision(recipe) if (RECIPES_DIR / f"{canonical_recipe(recipe)}.yaml").is_file() else None


def quantized_blocks(precision, num_layers: int) -> list[bool]:
    """Which decoder blocks run the quantized recipe; skip_quant_first/last_layers keep theirs in bf16."""
    if precision is None or not precision.quantized:
        return [False] * num_layers
    first, last = precision.skip_quant_first_layers, precision.skip_quant_last_layers
    return [first <= i < num_layers - last for i in range(num_layers)]


def block_recipe(recipe: str, precision, quantized: bool, cache_transposed: bool = True):
    """The recipe (registry name or RecipeOps with the configured options) of one block's compile backend."""
    if precision is None:
        return recipe
    if not quantized:
        return "bf16"
    if precision.weights == "nf4":
        from compile_passes.nf4_weights import nf4_recipe_ops

        return nf4_recipe_ops(precision.compute, precision.fp8_grad_format)
    if precision.uses_fp4:
        from compile_passes.fp4_weights import fp4_recipe_ops

        return fp4_recipe_ops(
            precision.fp4_format,
            precision.compute,
            precision.fp4_stochastic_rounding,
            precision.fp4_hadamard,
            precision.fp8_grad_format,
        )
    from compile_passes.fp8_weights import fp8_recipe_ops

    return fp8_recipe_ops(precision.fp8_grad_format, precision.compute, cache_transposed, precision.fp8_min_features)


# fp8 recipe, fp8_cache_transposed=auto: W^T's codes are cached while the bf16 base plus those codes (1 byte per
# weight) stay within this share of the GPU; weights quantized past it keep only their row codes (transposed in every
# backward). On an 80 GB H100: Qwen3-8B's 15 GiB of targeted weights take all of theirs (28% with the codes),
# Qwen3-14B's 27 GiB about half (a whole copy would not leave room for its activations).
FP8_TRANSPOSED_CACHE_SHARE = 0.40


def fp8_transposed_budget(precision, model: nn.Module) -> int | None:
    """Bytes of transposed FP8 codes the fp8 recipe caches (`precision.fp8_cache_transposed`; `ops.fp8`'s
    `set_transposed_budget`): None for every weight's (true; auto off the GPU or when they all fit), 0 for none
    (false), else what fits the share above."""
    setting = getattr(precision, "fp8_cache_transposed", "auto") if precision is not None else "auto"
    if setting != "auto":
        return None if setting == "true" else 0
    weights = [m.weight for m in model.modules() if hasattr(m, "lora_A") and getattr(m, "weight", None) is not None]
    if not weights or weights[0].device.type != "cuda":
        return None
    base = sum(w.numel() * w.element_size() for w in weights)
    codes = sum(w.numel() for w in weights)
    room = int(FP8_TRANSPOSED_CACHE_SHARE * torch.cuda.get_device_properties(weights[0].device).total_memory) - base
    return None if room >= codes else max(0, room)


def quantize_block_experts(block: nn.Module, weights: str) -> bool:
    """A Qwen3-MoE block's expert stacks stored in `weights` format ("fp8" / "nf4", ops/quantized_experts.py), one
    projection's stack at a time, each bf16 stack freed before the next is quantized (`GroupedExperts.quantize_`).
    Called by the block quantizers below, so the streamed loader and `quantize_base_weights` both convert them;
    a block without experts, or with experts converted already, is left alone. Returns whether it converted."""
    from ops.quantized_experts import can_quantize_experts
    from surogate.models.moe import EXPERT_PROJS, GroupedExperts

    experts = getattr(block.mlp, "experts", None)
    if not isinstance(experts, GroupedExperts) or experts.weight_format != "bf16":
        return False
    if not all(can_quantize_experts(getattr(experts, n), weights) for n in EXPERT_PROJS):
        log.warning(
            "%s expert stacks stay bf16: NF4 needs input widths divisible by 64", experts.proj_shape("down_proj")
        )
        return False
    experts.quantize_(weights)
    return True


def quantize_block_fp8(block: nn.Module) -> int:
    """qfp8: each LoRA base of one block becomes an `FP8LoRALinear` (e4m3 codes + per-row scales). Shared-input
    groups (q/k/v, gate/up) are packed, then quantized together into one packed storage, so the fused op reads
    zero-copy views; each bf16 weight is released as its group is done. Returns the number of modules converted."""
    from ops.fp8 import quantize_lora_base_
    from surogate.lora import LoRALinear

    colocate_block(block)
    quantize_block_experts(block, "fp8")
    converted = 0
    for parent_name, names in (*SHARED_INPUT_GROUPS, ("self_attn", ("o_proj",)), ("mlp", ("down_proj",))):
        parent = getattr(block, parent_name)
        members = [n for n in names if type(getattr(parent, n, None)) is LoRALinear]
        for group in [members] if len(members) == len(names) else [[n] for n in members]:
            if not group:
                continue
            for name, new in zip(group, quantize_lora_base_([getattr(parent, n) for n in group])):
                setattr(parent, name, new)
                converted += 1
    return converted


def quantize_block_nf4(block: nn.Module) -> int:
    """qnf4: each LoRA base of one block becomes an `NF4LoRALinear` (NF4 blocks run over the flattened weight, so
    a group's members are stored separately and the op dequantizes each into its row block)."""
    from ops.nf4 import can_quantize_nf4, quantize_lora_base_nf4_
    from surogate.lora import LoRALinear

    quantize_block_experts(block, "nf4")
    converted = 0
    for parent in (block.self_attn, block.mlp):
        for name, child in list(parent.named_children()):
            if type(child) is LoRALinear and can_quantize_nf4(child):
                setattr(parent, name, quantize_lora_base_nf4_(child))
                converted += 1
    return converted


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_block_fp4(block: nn.Module, fp4_format: str = "nvfp4") -> int:
    """qfp4: each LoRA projection of one block becomes an `FP4LoRALinear` in `fp4_format` (nvfp4 | mxfp4), one per
    module as nf4 (each weight has its own nvfp4 tensor scale). A Qwen3-MoE router ("gate") stays as it is."""
    from ops.fp4 import can_quantize_fp4, quantize_lora_base_fp4_
    from surogate.lora import LoRALinear

    converted = 0
    for parent in (block.self_attn, block.mlp):
        for name, child in list(parent.named_children()):
            if name in _PROJECTIONS and type(child) is LoRALinear and can_quantize_fp4(child, fp4_format):
                setattr(parent, name, quantize_lora_base_fp4_(child, fp4_format))
                converted += 1
    return converted


# precision.weights -> the function that stores one block's LoRA bases in that format, in place. The stream-
# quantizing loader (surogate/models/quantized_load.py) calls it on each block as it loads; `quantize_base_weights`
# on every quantized block of a loaded model. Each converts only plain `LoRALinear`s, so a second pass is a no-op.
# Options of a format (fp4_format) are bound by `block_quantizer`.
BLOCK_QUANTIZERS: dict[str, Callable[..., int]] = {
    "fp8": quantize_block_fp8,
    "nf4": quantize_block_nf4,
    "fp4": quantize_block_fp4,
}


def block_quantizer(weights: str, fp4_format: str = "nvfp4") -> Callable[[nn.Module], int] | None:
    """The one-block quantizer of a storage format with its options bound; None for a format without one."""
    quantize = BLOCK_QUANTIZERS.get(weights)
    if weights == "fp4":
        return functools.partial(quantize, fp4_format=fp4_format)
    return quantize


def quantize_base_weights(
    model: nn.Module, blocks: list[bool], embedding: bool = False, weights: str = "fp8", fp4_format: str = "nvfp4"
) -> int:
    """Store the LoRA bases of the quantized blocks in `weights` format (`BLOCK_QUANTIZERS`; fp4 in `fp4_format`),
    releasing the bf16 copies; blocks converted already (stream-quantized while loading) are skipped. With
    `embedding` (fp8), an untied input embedding is stored in FP8 too (`FP8Embedding`). Returns the number of
    modules converted."""
    quantize = block_quantizer(weights, fp4_format)
    converted = sum(quantize(block) for block, quantized in zip(model.model.layers, blocks) if quantized)
    embed = model.model.embed_tokens
    if weights == "fp8" and embedding and not model.args.tie_word_embeddings and type(embed) is nn.Embedding:
        from ops.fp8 import FP8Embedding

        model.model.embed_tokens = FP8Embedding(embed)
    return converted


def parallelize(
    model: nn.Module,
    *,
    recipe: str = "bf16",
    precision=None,
    compile: bool = True,
    use_passes: bool = True,
    recompute: bool = False,
    recompute_layers: int | None = None,
    recompute_saves: tuple[str, ...] = RECOMPUTE_SAVES,
) -> nn.Module:
    """Apply activation checkpointing, then per-block compilation, to `model.model.layers` in place.

    `precision` (a `surogate.config.PrecisionConfig`) defaults to the recipe file's. Quantized recipes: blocks
    outside skip_quant_first/last_layers get the recipe's op variant (FP8, NF4 or FP4), the others the bf16 one
    (each group its own backend); with FP8, NF4 or FP4 weight storage (qfp8, qnf4, qfp4) those blocks' LoRA bases
    are quantized here, before compiling, whether or not the model is compiled (the eager module dequantizes: it is the
    numerical reference).

    `recompute_layers`: with `recompute`, checkpoint only the first N blocks (None: all). Every block kept whole
    saves its activations (~0.6 GiB per block for Qwen3-8B at 2 x 2048 tokens) and skips its recomputed forward, so
    a memory budget is met at the least recompute by keeping as many blocks whole as fit. `recompute_saves`: what a
    checkpointed block keeps besides its input (surogate/recompute.py; empty: nothing).
    """
    layers = model.model.layers
    precision = resolve_precision(recipe, precision)
    if precision is not None and precision.fp8_lm_head:
        model.fp8_lm_head = True  # the chunked loss runs the LM head's GEMMs in FP8 (surogate/loss.py)
    quantized = quantized_blocks(precision, len(layers))
    stored = precision.weights if precision is not None and precision.weights != "bf16" else None
    if (compile and use_passes) or stored == "fp8":
        colocate_shared_input_weights(model)
    if stored is not None:
        n = quantize_base_weights(
            model, quantized, embedding=precision.quantize_embedding, weights=stored, fp4_format=precision.fp4_format
        )
        log.info("%s weight storage: %d LoRA base weights in %d of %d blocks", stored, n, sum(quantized), len(layers))
    if recompute:
        for i in range(len(layers) if recompute_layers is None else min(recompute_layers, len(layers))):
            layers[i] = checkpoint_block(layers[i], recompute_saves)
    if compile:
        from ops.cross_entropy import compile_ce_ahead
        from ops.fp8 import set_dx_fast_accum, set_transposed_budget

        budget = None
        if precision is not None and precision.weights == "bf16" and precision.compute == "fp8":
            budget = fp8_transposed_budget(precision, model)
            room = "all" if budget is None else f"{budget / 2**30:.1f} GiB"
            log.info(
                "fp8: caching each frozen weight's FP8 codes, and transposed codes for dX: %s; dX accumulation: %s",
                room, "fast" if precision.fp8_dx_fast_accum else "precise",
            )  # fmt: skip
        set_transposed_budget(budget)  # process-wide (the weight cache is): reset by every compiled model
        set_dx_fast_accum(bool(getattr(precision, "fp8_dx_fast_accum", False)))
        cache_t = budget != 0
        backends = {}  # one backend per distinct block recipe (fp8 blocks share one: regional compilation)
        for i, block in enumerate(layers):
            if quantized[i] not in backends:
                backends[quantized[i]] = compile_backend(
                    block_recipe(recipe, precision, quantized[i], cache_t), use_passes
                )
            layers[i] = torch.compile(block, backend=backends[quantized[i]], fullgraph=True)
        model.compile_backends = backends  # inspectable: tests and benchmarks read each backend's stats
        # The final RMSNorm runs once per micro-step outside the blocks. Eager, it is ~20 kernels over [tokens,
        # hidden] in fp32, forward and backward (~0.3 ms per micro-step on Qwen3-1.7B); compiled, one each way.
        # In place (`nn.Module.compile`): the state-dict keys stay as they are.
        model.model.norm.compile(fullgraph=True)
        head = getattr(model, "lm_head", None)
        if isinstance(head, nn.Linear):  # the loss's kernel, which no compiled graph traces (ops/cross_entropy.py)
            compile_ce_ahead(head.out_features, head.weight.dtype, head.weight.device)
    checkpointed = (len(layers) if recompute_layers is None else min(recompute_layers, len(layers))) if recompute else 0
    log.info(
        "blocks: %d, recompute: %d of them, compile=%s, passes=%s", len(layers), checkpointed, compile,
        compile and use_passes,
    )  # fmt: skip
    return model
