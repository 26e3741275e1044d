"""`python -m surogate.merge ADAPTER_DIR OUT_DIR [base=CHECKPOINT_DIR] [dtype=auto|bf16|fp32] [device=cpu|cuda]`

Folds a PEFT LoRA adapter into its base model and writes a full Hugging Face checkpoint (config.json, safetensors,
tokenizer files) that `transformers.AutoModelForCausalLM.from_pretrained` loads with no PEFT involved:

    W' = W + (lora_alpha / r) * B @ A        (computed in fp32, then stored in `dtype`)

`base` defaults to the adapter's `base_model_name_or_path`. `dtype=auto` keeps the base checkpoint's dtype.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

__all__ = ["merge", "main"]

_DTYPES = {
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float16": torch.float16,
}


def merge(
    adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "auto", device: str = "cpu"
) -> Path:
    from surogate.export import copy_tokenizer_files, load_adapter, merge_lora_, read_adapter_config
    from surogate.lora import LoRAConfig, apply_lora
    from surogate.models.checkpoint import inspect_checkpoint, load_model, save_hf_checkpoint

    cfg = read_adapter_config(adapter_dir)
    base = base or cfg.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ValueError(
            f"base model {base!r} is not a checkpoint directory: pass base=<checkpoint dir> (a preset's "
            "random base is saved by the training run as output_dir/base)"
        )
    inspect_checkpoint(base)
    if dtype == "auto":
        stored = json.loads((Path(base) / "config.json").read_text())
        dtype = stored.get("torch_dtype") or stored.get("dtype") or "bfloat16"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: use auto, bf16 or fp32")
    model, args = load_model(base, device, torch.float32, attn_backend="sdpa")  # fp32: fold without rounding twice
    apply_lora(model, LoRAConfig(rank=cfg["r"], alpha=cfg["lora_alpha"], target_modules=tuple(cfg["target_modules"])))
    load_adapter(model, adapter_dir)
    merge_lora_(model)
    model.to(_DTYPES[dtype])
    out_dir = Path(out_dir)
    save_hf_checkpoint(model, args, out_dir)
    copy_tokenizer_files(base, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0 if argv else 2
    positional = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(options) - {"base", "dtype", "device"}
    if len(positional) != 2 or unknown:
        print(
            "error: usage: python -m surogate.merge ADAPTER_DIR OUT_DIR [base=DIR] [dtype=auto|bf16|fp32] "
            "[device=cpu|cuda]",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        out = merge(positional[0], positional[1], **options)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"merged checkpoint written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
