"""FP4 recipes through parallelize: the pass inserts the FP4 op in exactly the configured blocks (skip first/last),
qfp4 stores the base weights only in FP4 (~0.28x the bf16 bytes) and hands the op the stored tensors, and the
compiled model matches its eager reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_lora import random_batch, tiny_lora_model

from compile_passes.registry import recipe_ops
from ops import fp4
from surogate.config import ConfigError, load_config, recipe_precision
from surogate.lora import LoRALinear
from surogate.parallelize import parallelize, quantized_blocks

FP4_OP = torch.ops.surogate.lora_linear_fp4.default


def _lora_base_bytes(model) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            total += m.weight.numel() * 2  # as bf16
        elif isinstance(m, fp4.FP4LoRALinear):
            total += sum(t.numel() * t.element_size() for t in (m.weight, *m.buffers()))
    return total


def test_recipes_and_options():
    p = recipe_precision("fp4")
    assert (p.weights, p.compute, p.fp4_format) == ("bf16", "fp4", "nvfp4") and p.uses_fp4 and not p.uses_fp8
    assert p.fp4_stochastic_rounding and p.fp4_hadamard
    assert (p.skip_quant_first_layers, p.skip_quant_last_layers) == (1, 2)  # first/last blocks in bf16 by default
    assert quantized_blocks(p, 6) == [False, True, True, True, False, False]
    q = recipe_precision("qfp4")
    assert (q.weights, q.compute) == ("fp4", "fp8") and quantized_blocks(q, 3) == [True] * 3 and q.uses_fp8
    cfg = load_config(["recipe=fp4", "precision.fp4_format=mxfp4", "precision.fp4_stochastic_rounding=false"])
    assert cfg.precision.fp4_format == "mxfp4" and not cfg.precision.fp4_stochastic_rounding
    assert recipe_ops("fp4").lora_linear is FP4_OP and dict(recipe_ops("qfp4").op_kwargs)["compute"] == "fp8"


@pytest.mark.parametrize(
    "options, message",
    [
        (["precision.fp4_format=fp6"], "fp4_format"),
        (["recipe=qnf4", "precision.compute=fp4"], "nf4 weights"),
        (["recipe=qfp4", "precision.quantize_embedding=true"], "quantize_embedding"),
    ],
)
def test_bad_fp4_options_fail_in_config(options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(options)


@pytest.mark.parametrize("recipe, compute", [("fp4", "fp4"), ("qfp4", "fp8"), ("qfp4", "bf16")])
def test_fp4_op_in_exactly_the_configured_blocks(recipe, compute):
    from ops import fp8

    torch._dynamo.reset()  # other tests' cache entries for Qwen3Block.forward count towards the recompile limit
    model, args = tiny_lora_model(4)
    ids, pos, labels = random_batch(args)
    bf16_bytes = _lora_base_bytes(model)
    p = dataclasses.replace(recipe_precision(recipe), compute=compute, skip_quant_first_layers=1)
    p = dataclasses.replace(p, skip_quant_last_layers=1)
    eager_model, _ = tiny_lora_model(4)
    parallelize(eager_model, recipe=recipe, precision=p, compile=False)
    eager = eager_model(ids, pos, labels)[0].item()  # qfp4: the eager FP4LoRALinear modules (dequantize + linear)
    parallelize(model, recipe=recipe, precision=p, compile=True)
    layers = [getattr(b, "_orig_mod", b) for b in model.model.layers]
    if recipe == "qfp4":
        kinds = [type(b.self_attn.q_proj) for b in layers]
        assert kinds == [LoRALinear, fp4.FP4LoRALinear, fp4.FP4LoRALinear, LoRALinear]
        ratio = _lora_base_bytes(layers[1]) / (bf16_bytes / 4)
        assert 0.27 < ratio < 0.29, ratio  # 4.5 bits per weight: codes + e4m3 per 16 (+ one fp32 per tensor)
    fp4.stats.clear()
    fp8_before = fp8.stats["fp8_gemms"]
    loss, _ = model(ids, pos, labels)
    loss.backward()
    bf16, quant = model.compile_backends[False].stats, model.compile_backends[True].stats
    assert "configure_fp4_lora_linears" not in bf16.rewrites and quant.rewrites["configure_fp4_lora_linears"] == 4
    if recipe == "fp4":
        # 2 FP4 blocks x (qkv, o, gate/up, down), forward and dX (the first block's input needs no grad: no dX)
        assert fp4.stats["fp4_gemms"] == 2 * 4 * 2 and fp4.stats["weights_quantized"] == 2 * 7
        assert abs(loss.item() - eager) / eager < 5e-2  # eager is bf16 here: the 4-bit rounding shows
    else:
        assert fp4.stats["fp4_gemms"] == 0 and fp4.stats["fp4_dequantized"] == 2 * 7 * 2  # forward and dX
        fp8_gemms = fp8.stats["fp8_gemms"] - fp8_before
    if compute == "bf16":
        assert fp8_gemms == 0
        assert abs(loss.item() - eager) / eager < 1e-4  # same dequantized weights: only rounding differs
    elif compute == "fp8":
        assert fp8_gemms == 2 * 4 * 2  # forward and dX of 2 blocks x 4 calls
        assert abs(loss.item() - eager) / eager < 2e-2  # eager: bf16 GEMMs on the same FP4 weights
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("fp4_format", ["nvfp4", "mxfp4"])
def test_pass_hands_the_op_the_stored_tensors(fp4_format):
    from compile_passes import make_backend
    from compile_passes.fp4_weights import fp4_recipe_ops
    from surogate.parallelize import quantize_base_weights

    torch._dynamo.reset()
    model, args = tiny_lora_model(1)
    assert quantize_base_weights(model, [True], weights="fp4", fp4_format=fp4_format) == 7
    backend = make_backend(fp4_recipe_ops(fp4_format, "bf16"), keep_graphs=True, inductor=False)
    model.model.layers[0] = torch.compile(model.model.layers[0], backend=backend, fullgraph=True)
    ids, pos, labels = random_batch(args)
    model(ids, pos, labels)[0].backward()
    (gm,) = backend.stats.graphs
    calls = [n for n in gm.graph.nodes if n.target is FP4_OP]
    assert sorted(len(n.args[1]) for n in calls) == [1, 1, 2, 3]  # o, down; gate/up; q/k/v fused
    for node in calls:
        assert len(node.args) == 14 and all(len(node.args[i]) == len(node.args[1]) for i in (7, 8))
        assert node.args[9:11] == (fp4_format, "bf16")
        assert all(w.meta["example_value"].dtype == torch.uint8 for w in node.args[1])
    assert not any(n.target is torch.ops.surogate.fp4_dequantize.default for n in gm.graph.nodes)


def test_pass_refuses_a_format_other_than_the_stored_one():
    from compile_passes import make_backend
    from compile_passes.fp4_weights import fp4_recipe_ops
    from surogate.parallelize import quantize_base_weights

    torch._dynamo.reset()
    model, args = tiny_lora_model(1)
    quantize_base_weights(model, [True], weights="fp4", fp4_format="mxfp4")
    backend = make_backend(fp4_recipe_ops("nvfp4", "bf16"), inductor=False)
    block = torch.compile(model.model.layers[0], backend=backend, fullgraph=True)
    model.model.layers[0] = block
    with pytest.raises(Exception, match="recipe says nvfp4"):
        model(*random_batch(args))
