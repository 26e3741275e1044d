"""End to end on CPU: `python -m surogate.train` on a tiny random Qwen3-MoE checkpoint learns, and its adapter (expert
LoRA included) loads in PEFT and merges into a checkpoint transformers loads, both computing the same logits. With
the q* recipes (experts and attention stored in FP8 / NF4) the adapter on a base dequantized the same way also
reproduces our quantized model's logits."""

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ops import quantized_experts
from ops.fp8 import FP8LoRALinear, dequantize
from ops.nf4 import NF4LoRALinear, dequantize_nf4
from surogate.config import recipe_precision
from surogate.data.config import BUNDLED_TOKENIZER
from surogate.export import load_adapter, lora_modules
from surogate.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora
from surogate.merge import main as merge_main
from surogate.models import load_model, save_hf_checkpoint
from surogate.models.moe import EXPERT_PROJS
from surogate.models.presets import TINY_VOCAB_SIZE
from surogate.parallelize import parallelize
from surogate.train import main

FAST = [
    "sequence_len=128",
    "per_device_train_batch_size=2",
    "lora_rank=8",
    "lora_alpha=16",
    "dtype=fp32",
    "device=cpu",
    "learning_rate=3e-3",
    "warmup_steps=2",
    "max_steps=12",
]
EXPERTS, LAYERS = 4, 2


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny random Qwen3-MoE checkpoint written by transformers, with the bundled demo tokenizer."""
    path = tmp_path_factory.mktemp("tiny_moe")
    config = transformers.Qwen3MoeConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(config).float().save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{BUNDLED_TOKENIZER}/{f}", path / f)
    return path


@pytest.mark.parametrize(
    "compile,recipe,targets",
    [
        ("false", "bf16", None),
        ("true", "bf16", "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,gate]"),
        ("false", "qfp8", None),  # attention bases and expert stacks stored in FP8 (eager dequantizes)
        ("true", "qnf4", None),  # ... in NF4, compiled (the expert op inside the compiled block)
    ],
    ids=["eager", "compiled+router", "qfp8", "qnf4-compiled"],
)
def test_moe_trains_and_its_adapter_loads_in_peft(moe_dir, tmp_path, compile, recipe, targets):
    peft = pytest.importorskip("peft")
    torch._dynamo.reset()  # other tests' cache entries for Qwen3Block.forward count towards the recompile limit
    quantized_experts.stats.clear()
    out = tmp_path / "run"
    extra = [f"lora_target_modules={targets}"] if targets else []
    args = [f"output_dir={out}", f"model={moe_dir}", f"compile={compile}", f"recipe={recipe}", *FAST, *extra]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    router = [k for k in adapter if ".mlp.gate." in k]
    assert len(router) == (2 * LAYERS if targets else 0)  # the router is frozen unless "gate" is targeted
    experts = [k for k in adapter if ".mlp.experts." in k]
    assert len(experts) == LAYERS * EXPERTS * 3 * 2
    assert all(adapter[k].abs().sum() > 0 for k in experts if "lora_B" in k)  # every expert got gradient
    # the quantized recipes ran the experts from their stored FP8 / NF4 form (forward and dX), the others never
    assert (quantized_experts.stats["experts_dequantized"] > 0) == recipe.startswith("q")
    if recipe.startswith("q"):
        _assert_peft_matches_quantized_model(moe_dir, out / "adapter", recipe, tmp_path / "dequantized", peft)

    merged_dir = tmp_path / "merged"
    assert merge_main([str(out / "adapter"), str(merged_dir), "dtype=fp32"]) == 0
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 32), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert (ref - plain).abs().max() > 1e-2  # the trained adapter changes the model


def _dequantized_base(model) -> dict[str, torch.Tensor]:
    """Every quantized base weight of our model, dequantized to fp32, under the HF-style module path."""
    out = {}
    for name, m in lora_modules(model).items():
        if isinstance(m, FP8LoRALinear):
            out[f"{name}.weight"] = dequantize(m.weight, m.weight_scale, torch.float32)
        elif isinstance(m, NF4LoRALinear):
            stored = (m.weight, m.weight_absmax, m.weight_absmax_factor, m.weight_absmax_mean)
            out[f"{name}.weight"] = dequantize_nf4(*stored, torch.float32)
    for i, layer in enumerate(model.model.layers):
        for proj in EXPERT_PROJS:
            out[f"model.layers.{i}.mlp.experts.{proj}"] = layer.mlp.experts.dense_weight(proj, torch.float32)
    return out


def _assert_peft_matches_quantized_model(moe_dir, adapter_dir, recipe, dequantized_dir, peft):
    """Our model with its base stored as the recipe stores it, against PEFT on that base dequantized (the adapter's
    logits must not depend on who runs it beyond fp32 rounding)."""
    ours, args = load_model(moe_dir, "cpu", torch.float32, attn_backend="sdpa")
    apply_lora(ours, LoRAConfig(rank=8, alpha=16, target_modules=DEFAULT_TARGETS))
    load_adapter(ours, adapter_dir)
    parallelize(ours, recipe=recipe, precision=recipe_precision(recipe), compile=False)
    assert all(layer.mlp.experts.weight_format != "bf16" for layer in ours.model.layers)
    dense, _ = load_model(moe_dir, "cpu", torch.float32, attn_backend="sdpa")
    weights = _dequantized_base(ours)
    assert len(weights) == LAYERS * (4 + 3)  # q, k, v, o and the three expert stacks of every layer
    with torch.no_grad():
        for name, w in weights.items():
            target = dense.get_parameter(name)
            assert 0 < (target - w).abs().max() < 0.2 * target.abs().max()  # really rounded, and only rounded
            target.copy_(w)
    save_hf_checkpoint(dense, args, dequantized_dir)
    ids = torch.randint(0, TINY_VOCAB_SIZE, (2, 32), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32).repeat(2, 1)
    base = transformers.AutoModelForCausalLM.from_pretrained(dequantized_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pos), peft_model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
