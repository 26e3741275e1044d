"""FP8 recipes through parallelize: the pass inserts the FP8 op in exactly the configured blocks, qfp8 stores the
base weights in FP8 (packed per shared-input group), and the compiled model matches its eager reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_lora import random_batch, tiny_lora_model

from ops import fp8
from surogate.config import ConfigError, load_config, recipe_precision
from surogate.lora import LoRALinear
from surogate.parallelize import parallelize, quantized_blocks

FP8_OP = torch.ops.surogate.lora_linear_fp8.default


def _model(layers: int = 4):
    return tiny_lora_model(layers)


def test_quantized_blocks_respects_skips():
    p = dataclasses.replace(recipe_precision("fp8"), skip_quant_first_layers=1, skip_quant_last_layers=2)
    assert quantized_blocks(p, 5) == [False, True, True, False, False]
    assert quantized_blocks(recipe_precision("bf16"), 3) == [False] * 3


@pytest.mark.parametrize("recipe", ["fp8", "qfp8"])
def test_fp8_op_in_exactly_the_configured_blocks(recipe):
    torch._dynamo.reset()  # other tests' cache entries for Qwen3Block.forward count towards the recompile limit
    model, args = _model(layers=4)
    ids, pos, labels = random_batch(args)
    eager = model(ids, pos, labels)[0].item()
    p = dataclasses.replace(recipe_precision(recipe), skip_quant_first_layers=1, skip_quant_last_layers=1)
    p = dataclasses.replace(p, fp8_min_features=0)  # the tiny model's projections are all narrow
    parallelize(model, recipe=recipe, precision=p, compile=True)
    assert fp8._dx_fast_accum is True  # the recipe's fp8_dx_fast_accum reached the op
    layers = [getattr(b, "_orig_mod", b) for b in model.model.layers]
    if recipe == "qfp8":
        kinds = [type(b.self_attn.q_proj) for b in layers]
        assert kinds == [LoRALinear, fp8.FP8LoRALinear, fp8.FP8LoRALinear, LoRALinear]
        attn = layers[1].self_attn
        assert attn.q_proj.weight.dtype == fp8.E4M3 and attn.q_proj.weight_scale.dtype == torch.float32
        # q/k/v codes packed back to back: the fused op reads a view
        assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel()
    fp8.stats.clear()
    loss, _ = model(ids, pos, labels)
    assert fp8.stats["fp8_gemms"] == 2 * 4  # 2 FP8 blocks x (qkv, o, gate/up, down)
    loss.backward()
    assert fp8.stats["fp8_gemms"] == 2 * 4 * 2  # + dX GEMMs
    bf16, quant = model.compile_backends[False].stats, model.compile_backends[True].stats
    assert "configure_fp8_lora_linears" not in bf16.rewrites and quant.rewrites["configure_fp8_lora_linears"] == 4
    # the compiled FP8 model stays close to the eager model (qfp8: whose weights were already FP8-dequantized)
    assert abs(loss.item() - eager) / eager < 2e-2
    fp8.set_dx_fast_accum(False)


def test_transposed_cache_setting():
    from surogate import parallelize as par

    model, _ = tiny_lora_model(1)
    p = recipe_precision("fp8")
    assert par.fp8_transposed_budget(p, model) is None  # auto on CPU: cache both (no GPU memory to fit)
    assert par.fp8_transposed_budget(dataclasses.replace(p, fp8_cache_transposed="false"), model) == 0
    assert par.fp8_transposed_budget(dataclasses.replace(p, fp8_cache_transposed="true"), model) is None
    with pytest.raises(ConfigError, match="fp8_cache_transposed"):
        load_config(["recipe=fp8", "precision.fp8_cache_transposed=maybe"])


def test_narrow_projections_stay_bf16():
    """fp8_min_features: calls whose input or output is narrower run the bf16 op (no FP8 GEMM, no cached codes);
    every call of the tiny model is 256 wide on its narrow side, so at 256 all four are FP8 and at 257 none is."""
    for min_features, fp8_calls in ((256, 4), (257, 0)):
        torch._dynamo.reset()
        model, args = _model(layers=1)
        p = dataclasses.replace(recipe_precision("fp8"), fp8_min_features=min_features)
        parallelize(model, recipe="fp8", precision=p, compile=True)
        fp8.stats.clear()
        model(*random_batch(args))[0].backward()
        assert fp8.stats["fp8_gemms"] == fp8_calls + (fp8_calls - 1 if fp8_calls else 0)  # no dX into the embedding
        assert (fp8.stats["weights_quantized"] > 0) == (fp8_calls > 0)  # nothing is cached for the bf16 calls
    assert recipe_precision("fp8").fp8_min_features == 2048 and recipe_precision("qfp8").fp8_min_features == 0


def test_fp8_lm_head_through_config_and_parallelize():
    cfg = load_config(["recipe=bf16", "precision.fp8_lm_head=true"])
    assert cfg.precision.fp8_lm_head and cfg.precision.uses_fp8  # preflight then asks for FP8 tensor cores
    torch._dynamo.reset()
    model, args = _model(layers=1)
    ids, pos, labels = random_batch(args)
    reference = model(ids, pos, labels)[0].item()
    parallelize(model, recipe="bf16", precision=cfg.precision, compile=False)
    assert model.fp8_lm_head
    fp8.stats.clear()
    loss, _ = model(ids, pos, labels)
    loss.backward()
    assert fp8.stats["fp8_gemms"] == 2  # one chunk: logits and grad_h (the blocks stay bf16)
    assert abs(loss.item() - reference) / reference < 2e-2
