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
