"""Kernels used by drafters: weight-only quantized matmuls (W8A16, W4A16) in Triton, with PyTorch references."""

from .quant_matmul import (
    QuantConfig,
    dequantize_int4,
    dequantize_int8,
    quant_matmul,
    quant_matmul_ref,
    quantize_int4,
    quantize_int8,
    triton_available,
    w4a16_matmul,
    w8a16_matmul,
)

__all__ = [
    "QuantConfig",
    "dequantize_int4",
    "dequantize_int8",
    "quant_matmul",
    "quant_matmul_ref",
    "quantize_int4",
    "quantize_int8",
    "triton_available",
    "w4a16_matmul",
    "w8a16_matmul",
]
