"""Custom ops (`torch.ops.surogate.*`): one op family per file, kernel + registration + fake + torch reference."""

from ops.lora_linear import frozen_concat, lora_linear, lora_linear_reference

__all__ = ["frozen_concat", "lora_linear", "lora_linear_reference"]
