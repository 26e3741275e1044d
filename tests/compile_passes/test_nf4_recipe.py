"""qnf4 through parallelize: the LoRA bases of exactly the configured blocks are stored only in NF4 (~0.26x the
bf16 bytes), the pass inserts the NF4 op with the stored tensors as its inputs, and the compiled model matches the
eager NF4 model (its numerical reference)."""

from __future__ import annotations

import dataclasses

import torch
from tiny_lora import random_batch, tiny_lora_model

from compile_passes.registry import recipe_ops
from ops import nf4
from surogate.config import load_config, recipe_precision
from surogate.lora import LoRALinear
from surogate.parallelize import parallelize

NF4_OP = torch.ops.surogate.lora_linear_nf4.default


def _model(layers: int = 3):
    return tiny_lora_model(layers)


def _lora_base_bytes(model) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            total += m.weight.numel() * 2  # as bf16
        elif isinstance(m, nf4.NF4LoRALinear):
            total += sum(t.numel() * t.element_size() for t in (m.weight, *m.buffers()))
    return total


def test_recipe_and_alias():
    p = recipe_precision("qnf4")
    assert (p.weights, p.compute) == ("nf4", "bf16") and not p.uses_fp8
    assert recipe_precision("qbnb") == p
    assert load_config(["recipe=qbnb"]).recipe == "qnf4"
    assert recipe_ops("qbnb") == recipe_ops("qnf4") and recipe_ops("qnf4").lora_linear is NF4_OP


def test_nf4_storage_pass_and_parity():
    torch._dynamo.reset()  # other tests' cache entries for Qwen3Block.forward count towards the recompile limit
    model, args = _model(layers=2)
    ids, pos, labels = random_batch(args)
    bf16_bytes = _lora_base_bytes(model)
    p = dataclasses.replace(recipe_precision("qnf4"), skip_quant_first_layers=1)
    eager_model, _ = _model(layers=2)
    parallelize(eager_model, recipe="qnf4", precision=p, compile=False)
    eager = eager_model(ids, pos, labels)[0]
    parallelize(model, recipe="qnf4", precision=p, compile=True)
    layers = [getattr(b, "_orig_mod", b) for b in model.model.layers]
    assert [type(b.self_attn.q_proj) for b in layers] == [LoRALinear, nf4.NF4LoRALinear]
    assert all(type(m) is nf4.NF4LoRALinear for b in layers[1:] for m in b.modules() if hasattr(m, "lora_A"))
    # memory: the quantized blocks' bases at 4.127 bits per weight (the bf16 tensors are gone)
    ratio = _lora_base_bytes(layers[1]) / (bf16_bytes / 2)
    assert 0.25 < ratio < 0.27, ratio
    loss, _ = model(ids, pos, labels)
    loss.backward()
    bf16, quant = model.compile_backends[False].stats, model.compile_backends[True].stats
    assert "configure_nf4_lora_linears" not in bf16.rewrites
    # one graph for the NF4 block (whose input requires grad; the first block's does not): qkv, o, gate/up, down
    assert quant.rewrites["configure_nf4_lora_linears"] == 4
    # compiled vs eager NF4 model: same dequantized weights, so only rounding differs
    assert abs(loss.item() - eager.item()) / eager.item() < 1e-4
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_pass_hands_the_op_the_stored_tensors():
    from compile_passes import make_backend
    from compile_passes.nf4_weights import nf4_recipe_ops
    from surogate.parallelize import quantize_base_weights

    torch._dynamo.reset()
    model, args = _model(layers=1)
    quantize_base_weights(model, [True], weights="nf4")
    backend = make_backend(nf4_recipe_ops(), keep_graphs=True, inductor=False)
    block = model.model.layers[0]
    model.model.layers[0] = torch.compile(block, backend=backend, fullgraph=True)
    ids, pos, labels = random_batch(args)
    model(ids, pos, labels)[0].backward()
    (gm,) = backend.stats.graphs
    calls = [n for n in gm.graph.nodes if n.target is NF4_OP]
    assert sorted(len(n.args[1]) for n in calls) == [1, 1, 2, 3]  # o, down; gate/up; q/k/v fused
    for node in calls:
        assert len(node.args) == 12 and all(len(node.args[i]) == len(node.args[1]) for i in (7, 8, 9))
        assert node.args[10:] == ("bf16", "e5m2")  # the recipe's compute and dy format
        assert all(w.meta["example_value"].dtype == torch.uint8 for w in node.args[1])
    assert not any(n.target is torch.ops.surogate.nf4_dequantize.default for n in gm.graph.nodes)


def test_fp8_compute_through_parallelize():
    """precision.compute=fp8: the pass hands the op its options, the base GEMMs run in FP8 (counted), and the
    compiled model stays within FP8 rounding of the eager NF4 model (bf16 arithmetic on the same NF4 weights)."""
    from ops import fp8

    torch._dynamo.reset()
    p = dataclasses.replace(recipe_precision("qnf4"), compute="fp8", fp8_grad_format="e4m3")
    assert p.uses_fp8
    eager_model, args = _model(layers=2)
    ids, pos, labels = random_batch(args)
    parallelize(eager_model, recipe="qnf4", precision=p, compile=False)
    eager = eager_model(ids, pos, labels)[0]
    model, _ = _model(layers=2)
    parallelize(model, recipe="qnf4", precision=p, compile=True)
    before = fp8.stats["fp8_gemms"]
    loss, _ = model(ids, pos, labels)
    loss.backward()
    # 4 calls per block, 2 blocks: 8 forward GEMMs and 7 dX (the first q/k/v input, the embedding, needs no grad)
    assert fp8.stats["fp8_gemms"] - before == 8 + 7
    assert abs(loss.item() - eager.item()) / eager.item() < 2e-2
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
