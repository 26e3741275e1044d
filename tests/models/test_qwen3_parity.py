"""Logit parity with transformers' Qwen3ForCausalLM / LlamaForCausalLM on the same saved checkpoint (CPU, fp32)."""

import dataclasses

import pytest
import torch
import transformers

from surogate.lora import LoRAConfig, apply_lora
from surogate.models import load_model
from surogate.models.qwen3 import ModelArgs

TOL = 1e-4


def _hf_config(arch: str, tied: bool, **extra):
    common = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
    )
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, rope_theta=1e6, **extra)
    return transformers.LlamaConfig(**common, rope_theta=5e5, **extra)  # no head_dim: hidden / heads


def _save_hf(tmp_path, config, **save_kwargs):
    torch.manual_seed(0)
    cls = transformers.Qwen3ForCausalLM if config.model_type == "qwen3" else transformers.LlamaForCausalLM
    hf = cls(config).float().eval()
    with torch.no_grad():  # HF inits norms to ones; perturb so a wrong norm placement shows up
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True, **save_kwargs)
    return hf


def _inputs(vocab, batch=2, seq=24):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.arange(seq).repeat(batch, 1)


CASES = [
    ("qwen3", True, {}),
    ("qwen3", False, {}),
    ("llama", False, {}),
    ("llama", True, {}),
    (
        "llama",
        False,
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
]


@pytest.mark.parametrize("arch,tied,extra", CASES, ids=["qwen3-tied", "qwen3", "llama", "llama-tied", "llama3-rope"])
def test_logits_match_transformers(tmp_path, arch, tied, extra):
    hf = _save_hf(tmp_path, _hf_config(arch, tied, **extra))
    model, args = load_model(tmp_path, "cpu", dtype=torch.float32)
    assert args.qk_norm == (arch == "qwen3") and args.tie_word_embeddings == tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, pos = _inputs(args.vocab_size)
    pos = pos + 40  # positions past original_max_position_embeddings exercise the llama3 rescaling
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        out = model(ids, pos)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= TOL


def test_sharded_checkpoint(tmp_path):
    hf = _save_hf(tmp_path, _hf_config("qwen3", tied=False), max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model, args = load_model(tmp_path, "cpu", dtype=torch.float32)
    ids, pos = _inputs(args.vocab_size)
    with torch.no_grad():
        assert (model(ids, pos) - hf(input_ids=ids, position_ids=pos).logits).abs().max().item() <= TOL


def test_loss_matches_transformers(tmp_path):
    """labels given (pre-shifted, surogate.data's convention) -> (loss_sum, n_tokens) equals HF's mean loss * count."""
    hf = _save_hf(tmp_path, _hf_config("qwen3", tied=True))
    model, args = load_model(tmp_path, "cpu", dtype=torch.float32)
    ids, pos = _inputs(args.vocab_size)
    hf_labels = ids.clone()  # HF shifts inside the model; ours are already shifted
    hf_labels[:, :5] = -100
    labels = torch.cat([hf_labels[:, 1:], torch.full_like(hf_labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos, labels=hf_labels).loss
        loss_sum, n = model(ids, pos, labels)
    assert n.item() == (labels != -100).sum().item()
    assert loss_sum.dtype == torch.float32
    torch.testing.assert_close(loss_sum / n, ref, rtol=1e-5, atol=1e-6)


def test_lora_keeps_base_output_until_b_changes(tmp_path):
    _save_hf(tmp_path, _hf_config("qwen3", tied=False))
    model, args = load_model(tmp_path, "cpu", dtype=torch.float32)
    ids, pos = _inputs(args.vocab_size)
    with torch.no_grad():
        base = model(ids, pos)
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(wrapped) == 7 * args.num_layers
    with torch.no_grad():
        assert torch.equal(model(ids, pos), base)  # B == 0 at init: exactly the base model
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
        assert (model(ids, pos) - base).abs().max().item() > 1e-3


def test_from_hf_config_round_trip_and_errors():
    cfg = _hf_config("llama", False).to_dict()
    args = ModelArgs.from_hf_config(cfg)
    assert args.head_dim == 16 and args.rope_theta == 5e5 and not args.qk_norm
    again = ModelArgs.from_hf_config(transformers.LlamaConfig(**args.to_hf_config()).to_dict())
    assert again == args
    qwen = dataclasses.replace(args, qk_norm=True, tie_word_embeddings=True)
    assert ModelArgs.from_hf_config(transformers.Qwen3Config(**qwen.to_hf_config()).to_dict()) == qwen
    with pytest.raises(ValueError, match="unsupported architecture.*mistral"):
        ModelArgs.from_hf_config({**cfg, "model_type": "mistral"})
    with pytest.raises(ValueError, match="num_kv_heads"):
        dataclasses.replace(args, num_kv_heads=3)


def test_position_ids_none_is_one_document_per_row():
    """position_ids None (rows of one document: plain causal attention) gives the loss and gradients of explicit
    positions 0..S-1 with the document mask."""
    torch.manual_seed(0)
    model, args = load_model("tiny", device="cpu", dtype=torch.float32)
    ids = torch.randint(0, args.vocab_size, (2, 24))
    labels = torch.randint(0, args.vocab_size, (2, 24))
    results = []
    for pos in (None, torch.arange(24).repeat(2, 1)):
        model.zero_grad()
        loss_sum, n = model(ids, pos, labels)
        loss_sum.backward()
        results.append([loss_sum.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
