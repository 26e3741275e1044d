"""Shared by the per-recipe end-to-end tests (tests/test_train_fp8.py, _nf4.py, _fp4.py): a short compiled CPU run."""

FAST_COMPILED = [
    "sequence_len=128",
    "per_device_train_batch_size=2",
    "lora_rank=8",
    "lora_alpha=16",
    "compile=true",
    "dtype=fp32",
    "device=cpu",
    "learning_rate=3e-3",
    "warmup_steps=2",
    "max_steps=8",
]
