"""LoRALinear is the plain formula; apply_lora wraps targets, freezes the rest and starts at the base model."""

import pytest
import torch
from torch import nn

from surogate.lora import LoRAConfig, LoRALinear, apply_lora, lora_state_dict


def _base(in_f=24, out_f=40, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_equals_formula(bias):
    base = _base(bias=bias)
    lora = LoRALinear(base, rank=4, alpha=12.0)
    with torch.no_grad():
        lora.lora_B.normal_()  # B is zero at init; make the update visible
    x = torch.randn(3, 5, 24)
    expected = x @ base.weight.T + (12.0 / 4) * (x @ lora.lora_A.T @ lora.lora_B.T)
    if bias:
        expected = expected + base.bias
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)


def test_b_zero_at_init_gives_base_output():
    base = _base()
    x = torch.randn(7, 24)
    ref = base(x)
    lora = LoRALinear(base, rank=8, alpha=16.0)
    assert lora.lora_B.abs().max() == 0 and lora.lora_A.abs().max() > 0
    assert torch.equal(lora(x), ref)


def test_only_lora_params_get_grads():
    model = nn.ModuleDict({"q_proj": nn.Linear(16, 32), "other": nn.Linear(32, 8)})
    wrapped = apply_lora(model, LoRAConfig(rank=2, target_modules=("q_proj",)))
    assert wrapped == ["q_proj"] and isinstance(model["q_proj"], LoRALinear)
    with torch.no_grad():
        model["q_proj"].lora_B.normal_()
    x = torch.randn(4, 16)
    model["other"](model["q_proj"](x)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert set(n for n, g in grads.items() if g is not None) == {"q_proj.lora_A", "q_proj.lora_B"}
    assert all(g.abs().sum() > 0 for g in grads.values() if g is not None)
    assert set(lora_state_dict(model)) == {"q_proj.lora_A", "q_proj.lora_B"}


def test_apply_lora_rejects_unmatched_targets():
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(model, LoRAConfig(target_modules=("qproj",)))
