"""4-bit base weights: the bitsandbytes NF4 linear, the CPU repack guard, and the dequantize seam."""

from .nf4 import cpu_supports_bf16, dequantize, guard_linear4bit, is_linear4bit, quantize_decoder_linears, quantize_linear

__all__ = ["cpu_supports_bf16", "dequantize", "guard_linear4bit", "is_linear4bit", "quantize_decoder_linears", "quantize_linear"]
