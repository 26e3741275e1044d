"""CUDA-graph micro-steps: when they are on, and (GPU) that replaying equals running the step normally."""

import dataclasses

import pytest
import torch

from surogate.config import ConfigError, load_config, recipe_precision
from surogate.cuda_graphs import GraphedMicroStep, accumulate_grads, cuda_graphs_enabled
from surogate.lora import LoRAConfig, apply_lora
from surogate.models.checkpoint import load_model
from surogate.parallelize import parallelize
from surogate.train import preflight

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_auto_is_on_for_cuda_unless_the_base_is_sharded():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cuda_graphs_enabled("auto", cuda)  # one process, or data parallel with a replicated base
    assert not cuda_graphs_enabled("auto", cuda, shard_base=True)  # FSDP communicates inside the micro-step
    assert not cuda_graphs_enabled("auto", cpu)
    assert not cuda_graphs_enabled("false", cuda)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        cuda_graphs_enabled("true", cpu)
    with pytest.raises(ValueError, match="replicated base"):
        cuda_graphs_enabled("true", cuda, shard_base=True)
    # varlen's mask reads document lengths on the host every batch: a capture may not synchronize
    assert not cuda_graphs_enabled("auto", cuda, attn_backend="varlen")
    assert cuda_graphs_enabled("auto", cuda, attn_backend="sdpa")
    with pytest.raises(ValueError, match="attn_backend=flex or sdpa"):
        cuda_graphs_enabled("true", cuda, attn_backend="varlen")


def test_forcing_graphs_on_cpu_is_a_config_error(tmp_path):
    # preflight, not main(): main's logging.basicConfig would bind the root logger to this test's captured stderr
    cfg = load_config([f"output_dir={tmp_path / 'run'}", "device=cpu", "cuda_graphs=true", "max_steps=1"])
    with pytest.raises(ConfigError, match="cuda_graphs=true needs a CUDA device"):  # main() turns it into exit 2
        preflight(cfg)


def _tiny_lora_model(recipe: str):
    torch.manual_seed(0)
    model, args = load_model("tiny", device="cuda", dtype=torch.bfloat16, attn_backend="flex")
    apply_lora(model, LoRAConfig(rank=8, alpha=16, dtype=torch.float32))
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):  # nonzero, so the LoRA branch and both LoRA gradients matter
            torch.nn.init.normal_(p, std=0.02)
    # every projection in FP8 for fp8 too (the tiny model is narrower than the recipe's fp8_min_features)
    precision = dataclasses.replace(recipe_precision(recipe), fp8_min_features=0)
    parallelize(model, recipe=recipe, precision=precision, compile=True, use_passes=True)
    model.select_loss_rows = False  # both runs compute the loss the same way
    return model, args


def _batches(vocab: int, n: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 257), generator=g)
        pos = torch.cat([torch.arange(100), torch.arange(156)]).expand(2, -1)  # two documents per row
        labels = ids[:, 1:].clone()
        labels[:, :40] = -100  # prompt tokens carry no loss
        out.append([t.contiguous().cuda() for t in (ids[:, :-1], pos, labels)])
    return out


def _graphed_equals_eager(recipe: str, batches: list) -> tuple:
    """Run `batches` as micro-steps on an eager-stepped model and through GraphedMicroStep (2 warm-up steps per kind
    of batch), check that losses and accumulated LoRA gradients agree; return (step, eager, graphed model)."""
    eager, _ = _tiny_lora_model(recipe)
    losses = []
    for b in batches:
        loss_sum, _ = eager(*b)
        loss_sum.backward()
        losses.append(loss_sum.detach())
    graphed_model, _ = _tiny_lora_model(recipe)
    step = GraphedMicroStep(graphed_model, warmup=2)
    graphed_losses = [step(*b)[0] for b in batches]
    torch.testing.assert_close(torch.stack(graphed_losses), torch.stack(losses), rtol=1e-3, atol=0)
    _assert_same_grads(graphed_model, eager, recipe)
    return step, eager, graphed_model


# Run-to-run noise of the gradients, relative to their norm, by recipe (the formats' usual test tolerances)
_NOISE = {"bf16": 1e-2, "fp8": 1e-1, "qfp8": 1e-1, "qnf4": 1e-1, "qfp4": 1e-1}


def _assert_same_grads(model, reference, recipe: str) -> None:
    """LoRA gradients equal up to run-to-run noise. Not elementwise: the SwiGLU-LoRA and q/k/v-RoPE-LoRA backwards
    sum dxa and dB with fp32 atomics (ops/swiglu_lora.py, ops/qkv_rope_lora.py), so two runs differ in the last
    bits; rounded to bf16 and flowing upstream that is up to ~5e-3 of a gradient's norm on this model with bf16
    GEMMs, and up to ~7e-2 where the upstream dy is re-quantized to FP8 (the first block's q/k LoRA A, qfp8; H100,
    three runs per recipe) or ~2e-2 where the weights are 4-bit. A stale or mis-replayed buffer is off by far
    more."""
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p.grad).all(), n
            err = ((p.grad.float() - grads[n].float()).norm() / grads[n].float().norm()).item()
            assert err < _NOISE[recipe], (n, err)


def test_accumulate_grads_matches_backward():
    """Two micro-steps through `accumulate_grads` leave the same .grad as two `backward()` calls: the first step's
    gradients are taken as they are, the second's added; a parameter the loss does not use keeps no gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    unused = torch.nn.Parameter(torch.randn(4))
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    xs = [torch.randn(7, 6) for _ in range(2)]

    def loss(params, x):
        w1, b1, w2, b2 = params
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w1, b1)), w2, b2).square().sum()

    params = list(model.parameters())
    for x in xs:
        accumulate_grads(loss(params, x), [*params, unused])
        loss(reference, x).backward()
    assert unused.grad is None
    for p, r in zip(params, reference):
        assert torch.isfinite(p.grad).all() and torch.allclose(p.grad, r.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("recipe", ["bf16", "fp8", "qfp8", "qnf4", "qfp4"])
def test_replayed_micro_steps_accumulate_the_same_gradients(recipe):
    batches = _batches(4096, 5)
    step, eager, graphed_model = _graphed_equals_eager(recipe, batches)
    assert step.replays == 3  # micro-steps 3-5 came from the graph

    # A second optimizer-step window: zero in place, replay again; the graph reads the updated LoRA weights.
    with torch.no_grad():
        for m in (eager, graphed_model):
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.01)
                    p.grad.zero_()
    loss_sum, _ = eager(*batches[0])
    loss_sum.backward()
    replayed = step(*batches[0])[0]
    torch.testing.assert_close(replayed, loss_sum.detach(), rtol=1e-3, atol=0)
    _assert_same_grads(graphed_model, eager, recipe)


@pytest.mark.gpu
@cuda
def test_rows_of_one_document_replay_their_own_graph():
    """position_ids None (plain causal attention, cuDNN) and packed rows (flex) each get a graph, in one pool."""
    packed = _batches(4096, 3)
    plain = [[ids, None, labels] for ids, _, labels in _batches(4096, 3)]
    order = [packed[0], plain[0], packed[1], plain[1], packed[2], plain[2], packed[0], plain[0]]
    step, _, _ = _graphed_equals_eager("bf16", order)
    assert step.replays == 4 and set(step.graphs) == {False, True}  # the last two of each kind were replayed
