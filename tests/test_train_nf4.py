"""End to end on CPU: `python -m surogate.train recipe=qnf4` (compiled, NF4-stored base, dequantized in the op)
learns."""

import json

import torch
from recipe_training import FAST_COMPILED as FAST
from safetensors.torch import load_file

from ops import nf4
from surogate.lora import DEFAULT_TARGETS
from surogate.models.presets import PRESETS
from surogate.train import main


def test_qnf4_recipe_trains(tmp_path):
    torch._dynamo.reset()  # other tests' cache entries for Qwen3Block.forward count towards the recompile limit
    nf4.stats.clear()
    out = tmp_path / "qnf4"
    assert main([f"output_dir={out}", "recipe=qbnb", *FAST]) == 0  # the alias runs recipes/qnf4.yaml
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert nf4.stats["nf4_dequantized"] > 0  # the NF4 op ran on stored codes, not a dense fallback
    # the adapter holds every LoRA module (NF4LoRALinear included), trained: B moved away from its zero init
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 2 * len(DEFAULT_TARGETS) * PRESETS["tiny"].num_layers
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)


def test_qnf4_from_a_checkpoint_quantizes_each_block_as_it_loads(tmp_path, monkeypatch):
    """A checkpoint (not a small preset, whose base is saved in bf16 first) takes the stream-quantized path."""
    import surogate.models.quantized_load as quantized_load
    from surogate.data.config import BUNDLED_TOKENIZER
    from surogate.export import copy_tokenizer_files
    from surogate.models import load_model, save_hf_checkpoint

    ckpt = tmp_path / "base"
    model, args = load_model("tiny", "cpu", torch.float32)
    save_hf_checkpoint(model, args, ckpt)
    copy_tokenizer_files(BUNDLED_TOKENIZER, ckpt)
    seen = []
    make_hook = quantized_load.stream_quantize_hook

    def spy(*hook_args):
        hook = make_hook(*hook_args)

        def on_block(index, block):
            hook(index, block)
            seen.append((index, type(block.mlp.down_proj)))

        return on_block

    monkeypatch.setattr(quantized_load, "stream_quantize_hook", spy)
    out = tmp_path / "run"
    fast = [a for a in FAST if not a.startswith(("compile=", "max_steps="))]
    assert main([f"output_dir={out}", f"model={ckpt}", "recipe=qnf4", *fast, "compile=false", "max_steps=2"]) == 0
    assert seen == [(i, nf4.NF4LoRALinear) for i in range(args.num_layers)]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
