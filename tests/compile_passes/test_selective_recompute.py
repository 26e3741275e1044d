"""surogate/recompute.py, through surogate/parallelize.py with our passes: selective activation checkpointing keeps
what `recompute_saves` names, so the compiled backward does not recompute the ops behind it, and the arithmetic
does not change."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from tiny_lora import random_batch, tiny_lora_model
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from surogate.parallelize import parallelize
from surogate.recompute import RECOMPUTE_SAVES, checkpoint_policy


class CountOps(TorchDispatchMode):
    """Counts our ops and the attention ops that run under it (the compiled backward calls them through the
    dispatcher; higher-order ops such as a recomputed random op's `run_with_rng_state` are counted by name)."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            self.calls[func.name()] += 1
            with _disable_current_modes():
                return func(*args, **kwargs)
        name = func.name()
        if name.startswith("surogate::") or "attention" in name:
            self.calls[name.split("::")[1]] += 1
        return func(*args, **kwargs)


def _recomputed_in_backward(saves: tuple[str, ...]) -> tuple[Counter, float, float]:
    """(ops the compiled backward runs, loss rel. error, worst LoRA-grad rel. error) for a tiny Qwen3 whose
    blocks are checkpointed with `saves`, against the eager model without checkpointing."""
    model, args = tiny_lora_model(2)
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    parallelize(model, recipe="bf16", compile=True, recompute=True, recompute_saves=saves)
    ids, pos, labels = random_batch(args)
    model(ids, pos, labels)[0].backward()  # compiles forward and backward
    model.zero_grad(set_to_none=True)
    loss = model(ids, pos, labels)[0]
    counter = CountOps()
    with counter:
        loss.backward()
    ref = reference(ids, pos, labels)[0]
    ref.backward()
    errs = [
        ((p.grad - q.grad).norm() / q.grad.norm()).item()
        for p, q in zip(model.parameters(), reference.parameters())
        if p.requires_grad
    ]
    return counter.calls, abs((loss - ref) / ref).item(), max(errs)


@pytest.mark.parametrize("saves", [(), RECOMPUTE_SAVES])
def test_saves_are_not_recomputed_and_grads_match_eager(saves):
    calls, loss_err, grad_err = _recomputed_in_backward(saves)
    assert loss_err < 1e-5 and grad_err < 1e-5, (loss_err, grad_err)
    layers, kept = 2, bool(saves)
    # always recomputed: the q/k/v and gate/up groups (their outputs are the big ones) and the q/k/v RoPE op
    assert calls["qkv_rope_lora"] == layers and calls["qkv_rope_lora_grad"] == layers
    assert calls["lora_linear"] == (2 if kept else 3) * layers  # o's only without its residual sum and xa kept
    assert calls["swiglu_lora_down"] == (0 if kept else layers)  # rerun only for xa_down
    assert calls["low_rank_add"] == (0 if kept else layers)  # o's: the residual stream after attention
    assert calls["keep"] == (0 if kept else 2 * layers)
    assert calls["run_with_rng_state"] == (0 if kept else layers)  # the attention forward (a seeded op)


def test_unknown_save_is_an_error():
    with pytest.raises(ValueError, match="unknown"):
        checkpoint_policy(["mlp"])
