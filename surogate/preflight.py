"""Checks that need the device, the model's shape or the whole dataset, run by `surogate.train.preflight` before
any weights are read or anything is written. Each raises `ConfigError` with one line that says what to set.

    check_device_support   the recipe and dtype against the GPU (FP8 needs compute capability >= 8.9, bf16 >= 8.0)
    check_sequence_len     sequence_len against the model's max_position_embeddings
    check_lora_targets     lora_target_modules against the model: the router only on MoE models, and on MoE models
                           only targets whose LoRA a PEFT adapter can hold (surogate.export.moe_target_problem)
    check_checkpoint_quantization  a pre-quantized (FP8, bitsandbytes NF4) checkpoint against the recipe's weight
                           storage
    build_checked_dataset  the full data pipeline (every row, not only the first few that `validate_data` reads),
                           and at least one batch per epoch; the trainer reuses the result
"""

from __future__ import annotations

import os
from typing import Any

import torch

from surogate.config import ConfigError, TrainConfig

__all__ = [
    "BF16_MIN_CAPABILITY",
    "FP8_MIN_CAPABILITY",
    "check_checkpoint_quantization",
    "check_device_support",
    "check_lora_targets",
    "check_sequence_len",
    "fp4_notice",
]

FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (L4, L40, RTX 40xx), Hopper (H100, H200), Blackwell
FP4_MIN_CAPABILITY = (10, 0)  # FP4 tensor cores: Blackwell (B200, GB200)
BF16_MIN_CAPABILITY = (8, 0)  # Ampere and newer


def check_device_support(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a recipe or dtype this GPU cannot run. On CPU everything runs (FP8 GEMMs are emulated, for tests)."""
    if device.type != "cuda":
        return
    cap = tuple(torch.cuda.get_device_capability(device))
    gpu = f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
    if cfg.precision.uses_fp8 and cap < FP8_MIN_CAPABILITY:
        raise ConfigError(
            f"recipe={cfg.recipe} needs FP8 tensor cores (compute capability >= 8.9: L4, L40, H100, H200, B200); "
            f"this GPU is {gpu}: use recipe=bf16 (and recompute=true or a smaller micro batch if memory is tight), "
            "or set precision.compute=bf16 with nf4/fp4 weights"
        )
    if dtype == torch.bfloat16 and cap < BF16_MIN_CAPABILITY:
        raise ConfigError(f"bf16 needs compute capability >= 8.0 (Ampere or newer); this GPU is {gpu}: set dtype=fp32")


def fp4_notice(cfg: TrainConfig, device: torch.device) -> str | None:
    """One line for recipes with FP4 compute: the GEMMs are emulated here, so they buy accuracy data, not speed."""
    if cfg.precision.compute != "fp4":
        return None
    where, blackwell = "this CPU", ""
    if device.type == "cuda":
        cap = tuple(torch.cuda.get_device_capability(device))
        where = f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]})"
        blackwell = " (not implemented yet)" if cap >= FP4_MIN_CAPABILITY else ""
    return (
        f"recipe={cfg.recipe}: FP4 GEMMs are emulated on {where} (quantize -> dequantize -> bf16 GEMM): FP4 numerics "
        f"at bf16 speed or slower; FP4 speed needs Blackwell (sm_100) FP4 tensor cores{blackwell}"
    )


def check_sequence_len(cfg: TrainConfig, args: Any) -> None:
    limit = getattr(args, "max_position_embeddings", None)
    if limit and cfg.sequence_len > limit:
        raise ConfigError(
            f"sequence_len={cfg.sequence_len} is longer than the model's max_position_embeddings ({limit}): "
            f"set sequence_len <= {limit}"
        )


def check_lora_targets(cfg: TrainConfig, args: Any) -> None:
    """Refuse, before training, a target set whose adapter could not be exported at the end."""
    from surogate.export import moe_target_problem
    from surogate.lora import ROUTER_TARGET
    from surogate.models.moe import EXPERT_PROJS

    targets = set(cfg.lora_target_modules)
    if not args.num_experts:
        if ROUTER_TARGET in targets:
            raise ConfigError(
                f"lora_target_modules: {ROUTER_TARGET!r} is the Qwen3-MoE router and this model is dense: remove it"
            )
        return
    expert_targets = targets & set(EXPERT_PROJS)
    has_dense_mlp = not all(args.is_moe_layer(i) for i in range(args.num_layers))
    problem = moe_target_problem(expert_targets, has_dense_mlp and bool(expert_targets))
    if problem:
        raise ConfigError(problem)


# quant_method -> (the checkpoint, its weight format, the storages that may hold its weights, the recipes to suggest).
# A checkpoint is dequantized at load: bf16 storage keeps it exactly, its own format requantizes it to (nearly) the
# same codes, a finer one rounds it once more; a coarser format or another 4-bit grid would round it a second time to
# fewer levels, so that is refused.
_REQUANTIZABLE = {
    "fp8": ("an FP8", "FP8", ("bf16", "fp8"), "recipe=qfp8 (or bf16/fp8)"),
    "bitsandbytes": ("a bitsandbytes NF4", "NF4", ("bf16", "fp8", "nf4"), "recipe=qnf4 (or bf16/fp8/qfp8)"),
}


def check_checkpoint_quantization(cfg: TrainConfig, quant: Any) -> None:
    """A pre-quantized checkpoint (`quant`: a `CheckpointQuantization`, None for a plain one) against the recipe's
    weight storage: FP8 loads into bf16 or fp8 storage (dequantized, or requantized per row), bitsandbytes NF4 into
    bf16, fp8 or nf4 (qnf4 gets the checkpoint's codes back); any other storage is refused."""
    if quant is None:
        return
    checkpoint, weight_format, storages, suggestion = _REQUANTIZABLE[quant.method]
    if cfg.precision.weights in storages:
        return
    raise ConfigError(
        f"model: {cfg.model} is {checkpoint} checkpoint (quantization_config.quant_method={quant.method}) and "
        f"recipe={cfg.recipe} would quantize its {weight_format} weights again to {cfg.precision.weights}: use "
        f"{suggestion}, or the checkpoint's bf16 original"
    )


def build_checked_dataset(cfg: TrainConfig, data_cfg: Any, tokenizer: Any) -> Any:
    """Format, tokenize and pack the whole dataset (a bad row anywhere, not just at the top, is a clean exit 2), and
    check that it fills at least one batch per epoch on every rank."""
    from surogate.data import DataError, build_dataset, steps_per_epoch

    try:
        dataset = build_dataset(data_cfg, tokenizer)
    except (DataError, OSError) as e:
        raise ConfigError(f"datasets: {e}") from None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it; the process group is not up yet
    if steps_per_epoch(dataset, cfg.per_device_train_batch_size, world_size) == 0:
        ranks = f" x {world_size} ranks" if world_size > 1 else ""
        raise ConfigError(
            f"the data packs into {len(dataset)} rows of {cfg.sequence_len} tokens, fewer than one batch of "
            f"{cfg.per_device_train_batch_size}{ranks}: lower per_device_train_batch_size or add data"
        )
    return dataset
