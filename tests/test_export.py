"""PEFT adapter export and merged checkpoints, held against peft and transformers themselves (CPU, fp32)."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from surogate.export import load_adapter, peft_state_dict, save_adapter
from surogate.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora
from surogate.merge import main as merge_main
from surogate.models import load_model

TOL = 1e-4
TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A small random Qwen3 checkpoint written by transformers' own save_pretrained."""
    path = tmp_path_factory.mktemp("base")
    config = transformers.Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).float().save_pretrained(path, safe_serialization=True)
    return path


def _lora_model(base_dir, seed=1):
    model, args = load_model(base_dir, "cpu", dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=tuple(TARGETS)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # nonzero B, so the adapter changes the output
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _inputs(vocab):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab, (2, 20), generator=g), torch.arange(20).repeat(2, 1)


def _save(model, path, base_dir):
    return save_adapter(model, path, rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS, base_model=str(base_dir))


def test_adapter_loads_in_peft_and_matches_logits(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = _lora_model(base_dir)
    adapter = _save(model, tmp_path / "adapter", base_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * len(TARGETS) * 2  # A and B, per target, per layer

    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ids, pos = _inputs(256)
    with torch.no_grad():
        ours = model(ids, pos)
        ref = peft_model(input_ids=ids, position_ids=pos).logits
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            plain = base(input_ids=ids, position_ids=pos).logits
    assert (ours - plain).abs().max() > 1e-2, "the adapter must matter for this test to mean anything"
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)


def test_merge_cli_writes_a_checkpoint_transformers_loads(base_dir, tmp_path):
    model = _lora_model(base_dir, seed=3)
    adapter = _save(model, tmp_path / "adapter", base_dir)
    out = tmp_path / "merged"
    assert merge_main([str(adapter), str(out), "dtype=fp32"]) == 0  # base from adapter_config
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, pos = _inputs(256)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, position_ids=pos).logits, model(ids, pos), atol=TOL, rtol=TOL)


def test_merge_cli_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        merge_main([str(tmp_path / "missing"), str(tmp_path / "out")])
    assert e.value.code == 2 and "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_wrapped_blocks_keep_peft_names_and_round_trip(base_dir, tmp_path):
    """Activation-checkpoint and torch.compile wrappers must not leak into adapter key names."""
    model = _lora_model(base_dir)
    names = set(peft_state_dict(model))
    layers = model.model.layers
    layers[0] = checkpoint_wrapper(layers[0])
    layers[1] = torch.compile(layers[1])  # wrapping only; nothing is compiled until called
    assert set(peft_state_dict(model)) == names
    adapter = _save(model, tmp_path / "adapter", base_dir)
    fresh = _lora_model(base_dir, seed=9)
    load_adapter(fresh, adapter)
    for (k, a), b in zip(peft_state_dict(model).items(), peft_state_dict(fresh).values()):
        assert torch.equal(a, b), k


def test_load_adapter_refuses_a_mismatched_adapter(base_dir, tmp_path):
    adapter = _save(_lora_model(base_dir), tmp_path / "adapter", base_dir)
    other, _ = load_model(base_dir, "cpu", dtype=torch.float32)
    apply_lora(other, LoRAConfig(rank=4, alpha=8.0, target_modules=DEFAULT_TARGETS))
    with pytest.raises(ValueError, match="does not match"):
        load_adapter(other, adapter)


# --- Qwen3-MoE: expert (and router) LoRA -------------------------------------------------------------------------

MOE_TARGETS = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _moe_base(path, **extra):
    """A small random Qwen3-MoE checkpoint (save_pretrained); the router perturbed so routing is not uniform."""
    config = transformers.Qwen3MoeConfig(
        **{
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "tie_word_embeddings": False,
            "max_position_embeddings": 256,
            **extra,
        }
    )
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(config).float()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(std=0.5)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def moe_base_dir(tmp_path_factory):
    return _moe_base(tmp_path_factory.mktemp("moe_base"))


def _moe_lora_model(base_dir, targets, seed=1):
    model, _ = load_model(base_dir, "cpu", dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=tuple(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # nonzero B everywhere (attention, every expert, the router when targeted)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save_moe(model, path, base_dir, targets, dropout=0.0):
    return save_adapter(
        model, path, rank=4, alpha=8.0, dropout=dropout, target_modules=targets, base_model=str(base_dir)
    )


@pytest.mark.parametrize("targets", [MOE_TARGETS, [*MOE_TARGETS, "gate"]], ids=["attention+experts", "+router"])
def test_moe_adapter_loads_in_peft_and_matches_logits(moe_base_dir, tmp_path, targets):
    peft = pytest.importorskip("peft")
    model = _moe_lora_model(moe_base_dir, targets)
    adapter = _save_moe(model, tmp_path / "adapter", moe_base_dir, targets, dropout=0.1)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["lora_dropout"] == 0.0  # PEFT's ParamWrapper (experts on transformers 5) refuses dropout
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    a = keys["base_model.model.model.layers.1.mlp.experts.7.up_proj.lora_A.weight"]
    b = keys["base_model.model.model.layers.1.mlp.experts.7.up_proj.lora_B.weight"]
    lora = model.model.layers[1].mlp.experts.up_proj_lora
    assert torch.equal(a, lora.lora_A[7]) and torch.equal(b, lora.lora_B[7])
    per_layer = 2 * 2 + 8 * 3 * 2 + (2 if "gate" in targets else 0)  # q, o; 8 experts x 3 projections; router
    assert len(keys) == 2 * per_layer

    hf = transformers.AutoModelForCausalLM.from_pretrained(moe_base_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ids, pos = _inputs(256)
    with torch.no_grad():
        ours = model(ids, pos)
        ref = peft_model(input_ids=ids, position_ids=pos).logits
        with peft_model.disable_adapter():
            plain = peft_model.get_base_model()(input_ids=ids, position_ids=pos).logits
    assert (ours - ref).abs().max().item() <= TOL
    assert (ours - plain).abs().max() > 1e-2, "the adapter must matter for this test to mean anything"
    for part in (".experts.", ".mlp.gate.") if "gate" in targets else (".experts.",):  # and each MoE part alone
        assert (ours - _without_lora(model, part, ids, pos)).abs().max() > 1e-2, part


@torch.no_grad()
def _without_lora(model, part, ids, pos):
    """Logits with the LoRA B of every parameter path containing `part` zeroed (restored afterwards)."""
    saved = {n: p.clone() for n, p in model.named_parameters() if part in n and n.endswith("lora_B")}
    params = dict(model.named_parameters())
    for n in saved:
        params[n].zero_()
    out = model(ids, pos)
    for n, p in saved.items():
        params[n].copy_(p)
    return out


def test_moe_merge_cli_and_adapter_round_trip(moe_base_dir, tmp_path):
    targets = [*MOE_TARGETS, "gate"]
    model = _moe_lora_model(moe_base_dir, targets, seed=3)
    adapter = _save_moe(model, tmp_path / "adapter", moe_base_dir, targets)
    fresh = _moe_lora_model(moe_base_dir, targets, seed=9)
    load_adapter(fresh, adapter)
    for (k, a), b in zip(peft_state_dict(model).items(), peft_state_dict(fresh).values()):
        assert torch.equal(a, b), k

    out = tmp_path / "merged"
    assert merge_main([str(adapter), str(out), "dtype=fp32"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(merged).__name__ == "Qwen3MoeForCausalLM"
    ids, pos = _inputs(256)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, position_ids=pos).logits, model(ids, pos), atol=TOL, rtol=TOL)


def test_moe_adapters_peft_cannot_express_are_refused(moe_base_dir, tmp_path):
    model = _moe_lora_model(moe_base_dir, ["q_proj", "gate_proj", "down_proj"])
    with pytest.raises(ValueError, match="gate_proj but not up_proj"):
        _save_moe(model, tmp_path / "adapter", moe_base_dir, ["q_proj", "gate_proj", "down_proj"])
    dense_layer = _moe_base(tmp_path / "mixed", mlp_only_layers=[1])
    model = _moe_lora_model(dense_layer, MOE_TARGETS)
    with pytest.raises(ValueError, match="dense MLP layers"):
        _save_moe(model, tmp_path / "adapter", dense_layer, MOE_TARGETS)
    assert not (tmp_path / "adapter").exists()
