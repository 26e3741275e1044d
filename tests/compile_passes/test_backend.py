"""Compiled (our passes + Inductor) against eager: forward and every LoRA gradient, per block and for Qwen3.

Inductor compiles are slow on a 2-core CI box, so each compiled module is built once per module-scoped fixture and
reused by the tests that read it.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_block import lora_grads, make_lora_block

from compile_passes import make_backend
from surogate.lora import LoRAConfig, apply_lora

OP = torch.ops.surogate.lora_linear.default
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: a whole bf16 block differs from eager by rounding order everywhere, so a norm-wise bound."""
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def compile_block(dtype: torch.dtype, dropout: float = 0.0, device: str = "cpu"):
    block = make_lora_block(dtype, dropout=dropout).to(device)
    backend = make_backend("bf16", keep_graphs=True)
    torch._dynamo.reset()
    return torch.compile(block, backend=backend, fullgraph=True), block, copy.deepcopy(block), backend


def run_fwd_bwd(module, grad_holder, x, seed):
    """(output, dx, LoRA grads) of one forward+backward on a copy of x; the same RNG seed for every module."""
    grad_holder.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y = module(x)
    torch.manual_seed(seed + 1)
    y.backward(torch.randn(y.shape, device=y.device).to(y.dtype))
    return [y, x.grad, *lora_grads(grad_holder).values()]


def assert_matches_eager(compiled, block, reference, dtype, device="cpu", seed=0, shape=(2, 9, 40)):
    """Fresh random input. fp32: compiled within 1e-5 of eager. bf16: both bf16 paths are compared with an fp32
    copy of the block (the truth): compiled within 2e-2 of it, or at worst 1.5x eager bf16's own error (a whole
    block in bf16 is ~1-2% off fp32 whichever order the roundings happen in)."""
    torch.manual_seed(100 + seed)
    x = torch.randn(*shape, dtype=dtype, device=device)
    got = run_fwd_bwd(compiled, block, x, seed)
    want = run_fwd_bwd(reference, reference, x, seed)
    assert len(got) == len(want) == 2 + 14
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
    if dtype == torch.float32:
        assert all(rel_err(g, w) <= TOL[dtype] for g, w in zip(got, want))
        return
    truth_module = copy.deepcopy(reference).float()
    truth = run_fwd_bwd(truth_module, truth_module, x.float(), seed)
    for g, w, t in zip(got, want, truth):
        assert rel_err(g, t) <= max(TOL[dtype], 1.5 * rel_err(w, t))


@pytest.fixture(scope="module")
def fp32_block():
    return compile_block(torch.float32)


def test_one_op_per_projection_group(fp32_block):
    compiled, block, reference, backend = fp32_block
    assert_matches_eager(compiled, block, reference, torch.float32)
    (gm,) = backend.stats.graphs  # fullgraph: one graph per block
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert sorted(len(n.args[1]) for n in calls) == [1, 1, 2, 3]
    assert not [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]


@pytest.mark.parametrize("seed", [1, 2])
def test_fp32_matches_eager(fp32_block, seed):
    compiled, block, reference, backend = fp32_block
    assert_matches_eager(compiled, block, reference, torch.float32, seed=seed)
    assert backend.stats.graphs_compiled == 1  # fresh inputs of the same shape: no recompile


def test_bf16_matches_eager():
    compiled, block, reference, _ = compile_block(torch.bfloat16)
    assert_matches_eager(compiled, block, reference, torch.bfloat16)


def test_dropout_matches_eager_with_same_rng():
    # Dropout stays an ordinary graph node; with fallback_random Inductor draws from the eager RNG in eager order,
    # so the masks (and so everything) match eager bit for bit in the mask.
    with torch._inductor.config.patch(fallback_random=True):
        compiled, block, reference, backend = compile_block(torch.float32, dropout=0.2)
        assert_matches_eager(compiled, block, reference, torch.float32)
    (gm,) = backend.stats.graphs
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    assert sorted(len(n.args[6]) for n in calls) == [1, 1, 2, 3]  # each projection keeps its own dropped input


def test_no_graph_break():
    block = make_lora_block()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(torch.randn(2, 5, 40))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _tiny_qwen3_with_lora():
    """(model, its eager copy, args): a 2-block Qwen3 with LoRA on every projection, B != 0."""
    from surogate.models.presets import PRESETS
    from surogate.models.qwen3 import Qwen3ForCausalLM

    args = dataclasses.replace(
        PRESETS["tiny"], vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2, head_dim=16
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(args)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0.0, 0.2)
    return model, copy.deepcopy(model), args


@pytest.mark.parametrize("packed", [False, True])
def test_qwen3_blocks_compiled_match_eager(packed):
    """packed: the q/k/v and gate/up weights share one storage each with spare rows for A (as training runs), so
    the xa_tail groups run one GEMM against [W; A] each way; else the op's two-GEMM fallback."""
    from ops.lora_linear import stats
    from surogate.parallelize import colocate_shared_input_weights

    model, reference, args = _tiny_qwen3_with_lora()
    if packed:
        assert colocate_shared_input_weights(model) == 2 * len(model.model.layers)
    backend = make_backend("bf16", keep_graphs=True)
    torch._dynamo.reset()
    tail_gemms, tail_copies = stats["weight_tail_gemms"], stats["weight_tail_copies"]
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(layer, backend=backend, fullgraph=True)

    input_ids = torch.randint(0, args.vocab_size, (2, 12))
    position_ids = torch.cat([torch.arange(7), torch.arange(5)]).repeat(2, 1)  # two packed documents per row
    logits, logits_ref = model(input_ids, position_ids), reference(input_ids, position_ids)
    assert rel_err(logits, logits_ref) <= 1e-5
    grad = torch.randn_like(logits)
    logits.backward(grad)
    logits_ref.backward(grad)
    got = {k.replace("._orig_mod", ""): g for k, g in lora_grads(model).items()}  # torch.compile's wrapper
    want = lora_grads(reference)
    assert got.keys() == want.keys() and len(want) == 2 * 14
    assert all(rel_err(got[k], want[k]) <= 1e-5 for k in want)
    for gm in backend.stats.graphs:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
        assert sorted(len(n.args[1]) for n in calls) == [1, 1, 2, 3]  # o; down (base alone); gate/up; q/k/v
        # RoPE's cos/sin reach the q/k/v op as the model's one half, the graph's cat((c, c), -1) nodes gone
        rope = [n for n in gm.graph.nodes if n.target is torch.ops.surogate.qkv_rope_lora.default]
        assert len(rope) == 1 and all(t.op == "placeholder" for t in rope[0].args[5:7])
        assert not [n for n in gm.graph.nodes if n.target is torch.cat and n.args[0][0] in rope[0].args[5:7]]
    # the real model's MLP and attention are what swiglu_lora_fusion.py and qkv_rope_lora_fusion.py match
    assert backend.stats.rewrites["fuse_swiglu_lora"] == len(model.model.layers)
    assert backend.stats.rewrites["fuse_qkv_rope_lora"] == len(model.model.layers)
    assert backend.stats.rewrites["fuse_down_lora_into_swiglu"] == len(model.model.layers)
    assert backend.stats.rewrites["put_xa_in_tail"] == 2 * len(model.model.layers)  # q/k/v and gate/up
    # both groups' forwards and dX against [W; A] in every block (but the first block's q/k/v, whose input, from the
    # frozen embedding, needs no gradient), or never without the packing
    assert stats["weight_tail_gemms"] - tail_gemms == (4 * len(model.model.layers) - 1 if packed else 0)
    # A copied next to the weights by each forward; each backward reuses its forward's copy
    assert stats["weight_tail_copies"] - tail_copies == (2 * len(model.model.layers) if packed else 0)


def test_checkpointed_blocks_get_the_ops_and_match_eager():
    """recompute=true: the block is the body of Dynamo's activation-checkpoint op; the passes must reach it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model, reference, args = _tiny_qwen3_with_lora()
    backend = make_backend("bf16", keep_graphs=True, inductor=False)
    torch._dynamo.reset()
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(checkpoint_wrapper(layer), backend=backend, fullgraph=True)

    input_ids = torch.randint(0, args.vocab_size, (2, 12))
    position_ids = torch.cat([torch.arange(7), torch.arange(5)]).repeat(2, 1)
    logits, logits_ref = model(input_ids, position_ids), reference(input_ids, position_ids)
    assert rel_err(logits, logits_ref) <= 1e-5
    grad = torch.randn_like(logits)
    logits.backward(grad)
    logits_ref.backward(grad)
    got = {
        k.replace("._orig_mod", "").replace("._checkpoint_wrapped_module", ""): g for k, g in lora_grads(model).items()
    }
    want = lora_grads(reference)
    assert got.keys() == want.keys() and all(rel_err(got[k], want[k]) <= 1e-5 for k in want)
    assert backend.stats.rewrites["fuse_shared_input_lora_linears"] > 0
    assert backend.stats.rewrites["fuse_swiglu_lora"] == len(model.model.layers)  # inside the checkpointed bodies
    assert backend.stats.rewrites["fuse_qkv_rope_lora"] == len(model.model.layers)
    assert backend.stats.rewrites["fuse_down_lora_into_swiglu"] == len(model.model.layers)
    bodies = [
        m for gm in backend.stats.graphs for m in gm.modules() if m is not gm and isinstance(m, torch.fx.GraphModule)
    ]
    assert bodies, "expected the checkpointed block as a subgraph"
    for body in bodies:  # o and down alone, gate/up fused, q/k/v fused
        calls = [n for n in body.graph.nodes if n.op == "call_function" and n.target is OP]
        assert sorted(len(n.args[1]) for n in calls) == [1, 1, 2, 3]  # o; down (base alone); gate/up; q/k/v


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_matches_eager_cuda():
    compiled, block, reference, _ = compile_block(torch.bfloat16, device="cuda")
    for seed in range(2):
        assert_matches_eager(compiled, block, reference, torch.bfloat16, device="cuda", seed=seed, shape=(2, 64, 40))
