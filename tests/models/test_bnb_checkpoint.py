"""bitsandbytes 4-bit NF4 checkpoints (a `load_in_4bit` model saved by transformers): read without bitsandbytes,
dequantized exactly for bf16/fp32 storage, requantized by qnf4 to the checkpoint's own codes.

The CI fixtures are written by `bnb_encode` below (bitsandbytes is not a dependency); `test_against_real_bitsandbytes`
holds that encoder and our loader against the real package when it is installed."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from prequantized import is_quantized, save_shards, tiny_qwen3_config
from safetensors.torch import load_file, save_file

from ops.nf4 import NF4, NF4LoRALinear
from surogate.config import ConfigError, load_config, recipe_precision
from surogate.lora import LoRAConfig
from surogate.models import inspect_checkpoint, load_model
from surogate.models.checkpoint import read_quantization
from surogate.models.quantized_load import load_lora_model

STATE = "quant_state.bitsandbytes__nf4"


# ---------------------------------------------------------------------------------- the format, written by hand


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map(signed=True)`: the 256-entry map of a double-quantized absmax."""
    data = [0.0, 1.0]
    for i in range(7):  # decades 1e-6 .. 1, with 2**i fraction steps each
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(data), dtype=torch.float32)


def _blockwise(x: torch.Tensor, table: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' reference blockwise quantizer: each block's absmax, and x / absmax -> nearest entry of `table`."""
    n = x.numel()
    blocks = F.pad(x.float().flatten(), (0, -n % block)).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).flatten()[:n]
    return torch.bucketize(scaled, (table[:-1] + table[1:]) / 2, out_int32=True).to(torch.uint8), absmax


def bnb_encode(w: torch.Tensor, double_quant: bool) -> dict[str, torch.Tensor]:
    """What transformers saves for one 4-bit NF4 Linear weight: {"": `X.weight`, suffix: `X.weight.{suffix}`}."""
    idx, absmax = _blockwise(w, NF4, 64)
    out = {"": ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1), "absmax": absmax, "quant_map": NF4.clone()}
    meta = {"quant_type": "nf4", "blocksize": 64, "dtype": str(w.dtype).removeprefix("torch."), "shape": list(w.shape)}
    if double_quant:
        dynamic, offset = _dynamic_map(), absmax.mean()
        out["absmax"], out["nested_absmax"] = _blockwise(absmax - offset, dynamic, 256)
        out["nested_quant_map"] = dynamic
        meta |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset.item()}
    out[STATE] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return out


def bnb_decode(t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The dense weight, as bitsandbytes' `dequantize_4bit` computes it (fp32, rounded once to `dtype`)."""
    meta = json.loads(bytes(t[STATE].tolist()))
    absmax = _block_absmax(t, meta)
    codes = t[""].flatten()
    idx = torch.stack([codes >> 4, codes & 15], dim=1).flatten().long()
    return (NF4[idx] * absmax.repeat_interleave(64)).view(meta["shape"]).to(dtype)


def _block_absmax(t: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    if "nested_absmax" not in t:
        return t["absmax"]
    n = t["absmax"].numel()
    nested = t["nested_quant_map"][t["absmax"].long()] * t["nested_absmax"].repeat_interleave(256)[:n]
    return nested + torch.tensor(meta["nested_offset"], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- the checkpoint


def _hf_model() -> transformers.Qwen3ForCausalLM:
    # intermediate 352: the MLP weights hold 1408 blocks, so their last double-quantization group is partial
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(tiny_qwen3_config(352)).to(torch.bfloat16).eval()


def write_bnb_checkpoint(path, hf, encode) -> dict[str, dict[str, torch.Tensor]]:
    """Save `hf` (bf16) as transformers saves a 4-bit model: each projection as `encode(weight)` gives it, companions
    in a shard of their own. Returns the stored tensors of each quantized weight."""
    hf.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    plain, companions, quantized = {}, {}, {}
    for key, w in state.items():
        if not is_quantized(key):
            plain[key] = w
            continue
        quantized[key] = encode(w)
        plain[key] = quantized[key][""]
        companions |= {f"{key}.{suffix}": t.clone() for suffix, t in quantized[key].items() if suffix}
    double_quant = "nested_absmax" in next(iter(quantized.values()))
    quant = transformers.BitsAndBytesConfig(  # what transformers writes into config.json (no bitsandbytes needed)
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype="bfloat16",
    ).to_dict()  # fmt: skip
    shards = {"model-00001-of-00002.safetensors": plain, "model-00002-of-00002.safetensors": companions}
    save_shards(path, shards, quant)
    return quantized


@pytest.fixture(scope="module", params=[True, False], ids=["double-quant", "fp32-absmax"])
def bnb_ckpt(request, tmp_path_factory):
    """(checkpoint dir, the stored tensors of each quantized weight, the bf16 transformers model it was made from)."""
    path = tmp_path_factory.mktemp("bnb")
    hf = _hf_model()
    with torch.no_grad():  # a block of zeros and a block far below its group's absmax: the edge cases of the format
        hf.model.layers[0].mlp.down_proj.weight[0, :64] = 0
        hf.model.layers[0].mlp.down_proj.weight[1, :64] *= 1e-5
    return path, write_bnb_checkpoint(path, hf, lambda w: bnb_encode(w, request.param)), hf


# -------------------------------------------------------------------------------------------------------- tests


def test_the_fixture_is_in_the_bnb_layout(bnb_ckpt):
    path, quantized, _ = bnb_ckpt
    stored = quantized["model.layers.0.mlp.up_proj.weight"]
    assert stored[""].dtype == torch.uint8 and stored[""].shape == (352 * 256 // 2, 1)
    assert stored["absmax"].shape == (352 * 256 // 64,)
    if "nested_absmax" in stored:
        assert stored["absmax"].dtype == torch.uint8 and stored["nested_absmax"].shape == (6,)  # 1408 / 256 -> 6
    assert inspect_checkpoint(path).intermediate_size == 352


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_load_is_the_exact_dequantized_weight(bnb_ckpt, dtype):
    path, quantized, hf = bnb_ckpt
    model, _ = load_model(path, "cpu", dtype=dtype)
    state, reference = model.state_dict(), hf.state_dict()
    for key, t in reference.items():
        if key in quantized:
            assert torch.equal(state[key], bnb_decode(quantized[key], dtype)), key
        else:
            assert torch.equal(state[key], t.to(dtype)), key
    w, ref = state["model.layers.1.mlp.up_proj.weight"].float(), reference["model.layers.1.mlp.up_proj.weight"].float()
    assert 10 * torch.log10(ref.pow(2).mean() / (w - ref).pow(2).mean()) > 18  # NF4: ~20 dB per weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qnf4_gets_the_checkpoint_codes_back(bnb_ckpt, dtype):
    """Blocks of 64 line up and each block's largest element is +-absmax, so requantizing gives bnb's codes, all of
    them (bf16 rounding moves an element over its absmax by <= 2^-7 relative, NF4's decision boundaries are >= 10%
    away). The weights differ only by the absmax storage: ours is linear int8 around the mean (half a step of its
    group; a whole step where +128 steps saturate at int8's 127), plus bf16's rounding of the absmax (2^-8
    relative)."""
    path, quantized, _ = bnb_ckpt
    model, _, _ = load_lora_model(path, "cpu", dtype, LoRAConfig(rank=4, alpha=8.0), recipe_precision("qnf4"))
    modules = {n + ".weight": m for n, m in model.named_modules() if isinstance(m, NF4LoRALinear)}
    assert sorted(modules) == sorted(quantized)
    for key, module in modules.items():
        stored = quantized[key]
        assert torch.equal(module.weight.flatten(), stored[""].flatten()), key
        ours = module.dequantized_weight(torch.float32).flatten()
        bnb = bnb_decode(stored, torch.float32).flatten()
        absmax = _block_absmax(stored, json.loads(bytes(stored[STATE].tolist())))
        step = (1 / module.weight_absmax_factor).repeat_interleave(256)[: absmax.numel()]
        int8_rounding = torch.where(module.weight_absmax == 127, step, step / 2)  # +128 steps saturate at 127
        rounding = absmax.abs() * (2**-8 if dtype == torch.bfloat16 else 0.0) + int8_rounding
        bound = (bnb.abs() / absmax.abs().clamp_min(1e-30).repeat_interleave(64)) * rounding.repeat_interleave(64)
        fp32_rounding = 1e-6 * bnb.abs() + 1e-12  # of the products NF4 value * absmax, a few ulps
        assert ((ours - bnb).abs() <= bound + fp32_rounding).all(), key


@pytest.mark.parametrize("recipe", ["bf16", "fp8", "qfp8", "qnf4", "qfp4"])
def test_preflight_takes_it_for_every_recipe_but_another_4bit_grid(bnb_ckpt, recipe):
    from surogate.preflight import check_checkpoint_quantization

    path = bnb_ckpt[0]
    cfg = load_config([f"model={path}", f"recipe={recipe}"])
    quant = read_quantization(path)
    assert (quant.method, quant.block_size) == ("bitsandbytes", 64)
    if recipe != "qfp4":
        check_checkpoint_quantization(cfg, quant)
        return
    with pytest.raises(ConfigError, match="would quantize its NF4 weights again to fp4: use recipe=qnf4"):
        check_checkpoint_quantization(cfg, quant)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(path, **quant):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] |= quant
    (path / "config.json").write_text(json.dumps(config))


def _edit_companions(path, edit):
    shard = path / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"] |= dict.fromkeys(tensors, shard.name)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _set_state(tensors, key, **meta):
    packed = json.loads(bytes(tensors[key].tolist())) | meta
    tensors[key] = torch.tensor(list(json.dumps(packed).encode()), dtype=torch.uint8)


KEY = "model.layers.1.self_attn.o_proj.weight"


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda p: _edit_config(p, load_in_4bit=False, load_in_8bit=True), "8-bit bitsandbytes checkpoints (load_in"),
        (lambda p: _edit_config(p, bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type='fp4' is not supported (only NF4)"),
        (lambda p: _edit_config(p, bnb_4bit_quant_storage="bfloat16"), "bnb_4bit_quant_storage='bfloat16' is not"),
        (lambda p: _edit_companions(p, lambda t: _set_state(t, f"{KEY}.{STATE}", blocksize=128)),
         f"{KEY} has bitsandbytes blocksize 128; surogate loads blocksize 64"),
        (lambda p: _edit_companions(p, lambda t: t.pop(f"{KEY}.absmax")), f"['{KEY}.absmax']"),
        (lambda p: _edit_companions(p, lambda t: t.pop(f"{KEY}.{STATE}")), f"{KEY} has bitsandbytes companions"),
        (lambda p: _edit_companions(p, lambda t: t.update({f"{KEY}.quant_map": torch.ones(8)})),
         f"1 wrong shape ['{KEY}.quant_map (8,) != (16,)']"),
    ],
    ids=["8bit", "fp4", "bf16-storage", "blocksize-128", "missing-absmax", "missing-state", "misshapen-companion"],
)  # fmt: skip
def test_unsupported_variants_are_refused_before_any_block_loads(bnb_ckpt, tmp_path, edit, needle):
    path = _copy(bnb_ckpt[0], tmp_path / "ckpt")
    edit(path)
    loaded = []  # the edits are in the last block: a refusal while reading would come after block 0 was loaded
    with pytest.raises(ValueError) as e:
        load_model(path, "cpu", on_block=lambda i, block: loaded.append(i))
    assert needle in str(e.value) and not loaded, str(e.value)


def test_against_real_bitsandbytes(tmp_path):
    """The CI encoder writes what bitsandbytes writes, and our loader reads what bitsandbytes reads back: a checkpoint
    whose projections are quantized by `bitsandbytes.functional.quantize_4bit` and saved as transformers saves them
    (`QuantState.as_dict(packed=True)` under `X.weight.`) loads to `dequantize_4bit`'s weights."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import QuantState, dequantize_4bit, quantize_4bit

    hf = _hf_model()
    for double_quant in (True, False):
        path = tmp_path / f"dq{double_quant}"
        path.mkdir()

        def encode(w: torch.Tensor, double_quant: bool = double_quant) -> dict[str, torch.Tensor]:
            codes, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            real = {"": codes, **state.as_dict(packed=True)}
            _assert_same_encoding(real, bnb_encode(w, double_quant))
            return real

        quantized = write_bnb_checkpoint(path, hf, encode)
        for dtype in (torch.float32, torch.bfloat16):
            state = load_model(path, "cpu", dtype=dtype)[0].state_dict()
            for key, stored in quantized.items():
                restored = QuantState.from_dict({k: v for k, v in stored.items() if k}, torch.device("cpu"))
                restored.dtype = dtype  # dequantize_4bit returns the state's dtype: ask for the one we loaded
                assert torch.equal(state[key], dequantize_4bit(stored[""], restored)), (key, dtype, double_quant)


def _assert_same_encoding(real: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    """`bnb_encode` writes bitsandbytes' tensors: the same keys, dtypes, shapes and values, except that bitsandbytes'
    C++ CPU kernel searches the dynamic map by bisection, which misses the nearest entry by one now and then (here
    10 of the 14592 double-quantized absmax codes, at most 1% of one weight's), where `bnb_encode` takes the nearest."""
    assert real.keys() == ours.keys()
    for key, t in real.items():
        assert t.dtype == ours[key].dtype and t.shape == ours[key].shape, key
        if key == "absmax" and t.dtype == torch.uint8:
            off_by = (t.int() - ours[key].int()).abs()
            assert off_by.max() <= 1 and off_by.float().mean() < 0.02, key
        else:
            assert torch.equal(t, ours[key]), key
