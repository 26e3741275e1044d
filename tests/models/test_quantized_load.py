"""Stream-quantized loading (surogate/models/quantized_load.py): the same model as load-then-quantize, code for code,
without ever holding the whole model in bf16."""

import dataclasses
import gc

import pytest
import torch

from ops.fp4 import FP4LoRALinear
from ops.fp8 import FP8LoRALinear
from ops.nf4 import NF4LoRALinear
from surogate.config import recipe_precision
from surogate.lora import LoRAConfig, LoRALinear, apply_lora
from surogate.models import PRESETS, load_model, save_hf_checkpoint
from surogate.models.quantized_load import load_lora_model, stream_quantize_hook
from surogate.parallelize import parallelize

ARGS = dataclasses.replace(
    PRESETS["tiny"], vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=6, tie_word_embeddings=False
)
LORA = LoRAConfig(rank=4, alpha=8.0)
QUANTIZED = {"qfp8": FP8LoRALinear, "qnf4": NF4LoRALinear, "qfp4": FP4LoRALinear}


def _precision(recipe: str):
    # the first block stays bf16: mixed models exercise the hook's skip and parallelize's conversion of the rest;
    # qfp4 in its non-default format, so the hook must pass fp4_format on
    p = dataclasses.replace(recipe_precision(recipe), skip_quant_first_layers=1)
    return dataclasses.replace(p, fp4_format="mxfp4") if recipe == "qfp4" else p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A bf16 checkpoint in shards of ~24 KiB: a block's tensors lie in several files."""
    path = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model, args = load_model(ARGS, "cpu", dtype=torch.bfloat16)
    save_hf_checkpoint(model, args, path, max_shard_bytes=24 * 1024)
    assert len(list(path.glob("*.safetensors"))) > ARGS.num_layers
    return path


def _logits(model):
    ids = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, torch.arange(16).repeat(2, 1))


def _nonzero_lora_B(model):
    torch.manual_seed(3)  # B != 0, identically on both models, so the adapters show in the logits
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.02)


@pytest.mark.parametrize("recipe", ["qfp8", "qnf4", "qfp4"])
@pytest.mark.parametrize("source", ["checkpoint", "preset"])
def test_stream_equals_load_then_quantize(ckpt, recipe, source):
    src = ckpt if source == "checkpoint" else ARGS
    precision = _precision(recipe)
    torch.manual_seed(0)
    ref, _ = load_model(src, "cpu", dtype=torch.bfloat16)
    apply_lora(ref, LORA)
    parallelize(ref, recipe=recipe, precision=precision, compile=False)
    torch.manual_seed(0)
    streamed, _, wrapped = load_lora_model(src, "cpu", torch.bfloat16, LORA, precision)
    assert len(wrapped) == 7 * ARGS.num_layers
    kinds = [type(b.self_attn.q_proj) for b in streamed.model.layers]
    assert kinds == [LoRALinear] + [QUANTIZED[recipe]] * (ARGS.num_layers - 1)  # before parallelize, already stored
    parallelize(streamed, recipe=recipe, precision=precision, compile=False)  # finds nothing left to quantize

    ref_state, state = ref.state_dict(), streamed.state_dict()
    assert list(state) == list(ref_state)
    for key, t in state.items():  # codes, scales, absmax, bf16 weights and the adapters' initial A
        assert t.dtype == ref_state[key].dtype and torch.equal(t, ref_state[key]), key
    assert any(t.dtype == torch.uint8 if recipe != "qfp8" else t.dtype == torch.float8_e4m3fn for t in state.values())
    if recipe == "qfp4":
        assert {m.fp4_format for m in streamed.modules() if isinstance(m, FP4LoRALinear)} == {"mxfp4"}
    trainable = [n for n, p in streamed.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in ref.named_parameters() if p.requires_grad] and len(trainable) == 2 * len(wrapped)
    _nonzero_lora_B(ref), _nonzero_lora_B(streamed)
    assert torch.equal(_logits(streamed), _logits(ref))


def _live_bytes(dtype: torch.dtype) -> int:
    """Bytes of every CPU tensor storage of `dtype` that Python can reach (each storage once)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        # Plain tensors and parameters only: FakeTensors that earlier compiled tests left behind have no storage.
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.dtype == dtype and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _block_bytes(model) -> tuple[int, int]:
    """(bf16 bytes of one decoder block, of everything outside the blocks) of a bf16 model."""
    block = sum(p.nbytes for p in model.model.layers[0].parameters())
    rest = sum(p.nbytes for n, p in model.named_parameters() if not n.startswith("model.layers."))
    return block, rest


@pytest.mark.parametrize("recipe", ["qfp8", "qnf4", "qfp4"])
@pytest.mark.parametrize("source", ["checkpoint", "preset"])
def test_the_whole_bf16_model_is_never_resident(ckpt, recipe, source):
    """Counts live bf16 storages each time a block is complete: one block beside the quantized ones, never all."""
    src = ckpt if source == "checkpoint" else ARGS
    precision = recipe_precision(recipe)
    whole, _ = load_model(src, "cpu", dtype=torch.bfloat16)
    block_bytes, rest_bytes = _block_bytes(whole)
    whole_bytes = rest_bytes + ARGS.num_layers * block_bytes
    del whole
    baseline = _live_bytes(torch.bfloat16)

    hook = stream_quantize_hook(precision, ARGS.num_layers, LORA)
    peaks = []

    def measuring_hook(index, block):
        peaks.append(_live_bytes(torch.bfloat16) - baseline)  # block `index` complete, still bf16
        hook(index, block)

    model, _ = load_model(src, "cpu", dtype=torch.bfloat16, on_block=measuring_hook)
    after = _live_bytes(torch.bfloat16) - baseline
    norms = sum(p.nbytes for n, p in model.model.layers[0].named_parameters() if "norm" in n)
    # one bf16 block beside the embedding, LM head and the quantized blocks' norms, at every step
    assert len(peaks) == ARGS.num_layers
    assert max(peaks) <= rest_bytes + block_bytes + ARGS.num_layers * norms, (peaks, block_bytes, rest_bytes)
    assert max(peaks) < whole_bytes / 2
    assert after <= rest_bytes + ARGS.num_layers * norms
    del model

    load_then_quantize, _ = load_model(src, "cpu", dtype=torch.bfloat16)  # what the measure sees without the hook
    assert _live_bytes(torch.bfloat16) - baseline >= whole_bytes


MOE_ARGS = dataclasses.replace(ARGS, num_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)


@pytest.mark.parametrize("recipe,fmt", [("qfp8", "fp8"), ("qnf4", "nf4")])
@pytest.mark.parametrize("source", ["checkpoint", "preset"])
def test_moe_expert_stacks_stream_quantize(tmp_path, recipe, fmt, source):
    """Qwen3-MoE: the block quantizers store the expert stacks too, so they are quantized as each block loads and
    the result is load-then-quantize's, stored tensor for stored tensor."""
    src = MOE_ARGS
    if source == "checkpoint":
        torch.manual_seed(0)
        save_hf_checkpoint(load_model(MOE_ARGS, "cpu", dtype=torch.bfloat16)[0], MOE_ARGS, tmp_path)
        src = tmp_path
    precision = _precision(recipe)
    torch.manual_seed(0)
    ref, _ = load_model(src, "cpu", dtype=torch.bfloat16)
    apply_lora(ref, LORA)
    parallelize(ref, recipe=recipe, precision=precision, compile=False)
    torch.manual_seed(0)
    streamed, _, wrapped = load_lora_model(src, "cpu", torch.bfloat16, LORA, precision)
    formats = [b.mlp.experts.weight_format for b in streamed.model.layers]
    assert formats == ["bf16"] + [fmt] * (MOE_ARGS.num_layers - 1)  # quantized while loading (first block skipped)
    assert "model.layers.1.mlp.experts.gate_proj" in wrapped  # expert LoRA added on the quantized stacks
    parallelize(streamed, recipe=recipe, precision=precision, compile=False)
    ref_state, state = ref.state_dict(), streamed.state_dict()
    assert list(state) == list(ref_state)
    assert f"model.layers.1.mlp.experts.down_proj_{'scale' if fmt == 'fp8' else 'absmax'}" in state
    for key, t in state.items():
        assert t.dtype == ref_state[key].dtype and torch.equal(t, ref_state[key]), key
    _nonzero_lora_B(ref), _nonzero_lora_B(streamed)
    assert torch.equal(_logits(streamed), _logits(ref))
