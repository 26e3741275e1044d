"""Hugging Face fine-grained FP8 checkpoints (the Qwen3-*-FP8 format: e4m3 `weight` + fp32 `weight_scale_inv` per
128 x 128 tile, `quantization_config.quant_method: fp8`): dequantized at load for bf16 storage, requantized per row
for qfp8, and close to the bf16 model they were made from."""

import pytest
import torch
import transformers
from prequantized import is_quantized, save_shards, tiny_qwen3_config
from safetensors.torch import load_file, save_file

from ops.fp8 import FP8LoRALinear, dequantize_blockwise, quantize_blockwise
from surogate.config import recipe_precision
from surogate.lora import LoRAConfig, apply_lora
from surogate.models import inspect_checkpoint, load_model
from surogate.models.quantized_load import load_lora_model
from surogate.parallelize import parallelize

BLOCK = 128
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """(FP8 checkpoint dir, the bf16 transformers model it was made from). Scales sit in a shard of their own, so
    a weight and its scales are read from different files."""
    path = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    # intermediate 320 and kv 128 rows: full and partial 128-tiles in both dimensions
    hf = transformers.Qwen3ForCausalLM(tiny_qwen3_config(320)).to(torch.bfloat16).eval()
    hf.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    codes, scales = {}, {}
    for key, w in state.items():
        if is_quantized(key):
            codes[key], scales[key + "_scale_inv"] = quantize_blockwise(w, BLOCK)
        else:
            codes[key] = w
    shards = {"model-00001-of-00002.safetensors": codes, "model-00002-of-00002.safetensors": scales}
    save_shards(path, shards, QUANT)
    return path, hf


def _inputs(vocab: int):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    return ids, torch.arange(24).repeat(2, 1)


def _sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (10 * torch.log10(ref.float().pow(2).mean() / (x.float() - ref.float()).pow(2).mean())).item()


def test_the_fixture_is_in_the_hf_fp8_format(fp8_ckpt):
    path, _ = fp8_ckpt
    codes = load_file(path / "model-00001-of-00002.safetensors")
    scales = load_file(path / "model-00002-of-00002.safetensors")
    assert codes["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert scales["model.layers.0.mlp.up_proj.weight_scale_inv"].shape == (3, 2)  # ceil(320/128), ceil(256/128)
    assert codes["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert inspect_checkpoint(path).hidden_size == 256


def test_bf16_load_dequantizes_and_matches_the_bf16_model(fp8_ckpt):
    path, hf = fp8_ckpt
    model, args = load_model(path, "cpu", dtype=torch.bfloat16)
    codes = load_file(path / "model-00001-of-00002.safetensors")
    scales = load_file(path / "model-00002-of-00002.safetensors")
    state = model.state_dict()
    for key in codes:
        if is_quantized(key):  # exactly the tile-scaled codes, rounded once to bf16
            assert torch.equal(state[key], dequantize_blockwise(codes[key], scales[key + "_scale_inv"], BLOCK)), key
        else:
            assert torch.equal(state[key], codes[key]), key
    ids, pos = _inputs(args.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        out = model(ids, pos)
    # e4m3 weights (~3 mantissa bits; 31.6 dB per weight here) through two blocks: 24.3 dB; bf16 alone gives 43 dB
    assert _sqnr_db(out, ref) > 22


def test_qfp8_stream_load_requantizes_per_row(fp8_ckpt):
    path, hf = fp8_ckpt
    precision = recipe_precision("qfp8")
    lora = LoRAConfig(rank=4, alpha=8.0)
    torch.manual_seed(0)
    model, args, _ = load_lora_model(path, "cpu", torch.bfloat16, lora, precision)
    torch.manual_seed(0)
    ref, _ = load_model(path, "cpu", dtype=torch.bfloat16)  # load (dequantized), then quantize in parallelize
    apply_lora(ref, lora)
    parallelize(ref, recipe="qfp8", precision=precision, compile=False)
    parallelize(model, recipe="qfp8", precision=precision, compile=False)
    assert all(type(b.mlp.up_proj) is FP8LoRALinear for b in model.model.layers)
    up = model.model.layers[0].mlp.up_proj
    assert up.weight.dtype == torch.float8_e4m3fn and up.weight_scale.shape == (320,)  # one scale per row
    for key, t in model.state_dict().items():
        assert torch.equal(t, ref.state_dict()[key]), key
    ids, pos = _inputs(args.vocab_size)
    with torch.no_grad():
        bf16 = hf(input_ids=ids, position_ids=pos).logits
        out = model(ids, pos)
    # two e4m3 roundings (tile scales, then row scales): 20.2 dB here against 24.3 dB for the tile-scaled weights
    assert _sqnr_db(out, bf16) > 18


def test_scale_of_the_wrong_shape_is_reported_before_reading(fp8_ckpt, tmp_path):
    path, _ = fp8_ckpt
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    scales = load_file(tmp_path / "model-00002-of-00002.safetensors")
    scales["model.layers.1.self_attn.q_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(scales, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"1 wrong shape.*layers\.1\.self_attn\.q_proj\.weight_scale_inv \(1, 1\)"):
        load_model(tmp_path, "cpu", dtype=torch.bfloat16)
