"""Model definitions (Qwen3 / Llama dense decoder), shape presets and Hugging Face checkpoint I/O."""

from surogate.models.checkpoint import inspect_checkpoint, load_model, save_hf_checkpoint
from surogate.models.presets import PRESETS
from surogate.models.qwen3 import ModelArgs, Qwen3ForCausalLM

__all__ = ["PRESETS", "ModelArgs", "Qwen3ForCausalLM", "inspect_checkpoint", "load_model", "save_hf_checkpoint"]
