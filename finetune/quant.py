"""Quantization settings -> `transformers.BitsAndBytesConfig`."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import BitsAndBytesConfig

from finetune.config import QuantConfig

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def build_bnb_config(q: QuantConfig) -> Optional[BitsAndBytesConfig]:
    """The bitsandbytes config for `quant.mode`; None for a 16-bit (unquantized) base."""
    if q.mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.mode,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
            bnb_4bit_quant_storage=torch_dtype(q.quant_storage) if q.quant_storage != "uint8" else torch.uint8,
        )
    if q.mode == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True,
            llm_int8_threshold=q.int8_threshold,
            llm_int8_skip_modules=list(q.int8_skip_modules) if q.int8_skip_modules else None,
            llm_int8_enable_fp32_cpu_offload=q.int8_fp32_cpu_offload,
        )
    return None


def describe(q: QuantConfig) -> str:
    """One line for the run summary."""
    if q.mode in ("nf4", "fp4"):
        dq = "double-quant" if q.double_quant else "single-quant"
        return f"4-bit {q.mode.upper()}, {dq}, compute {q.compute_dtype}, storage {q.quant_storage}"
    if q.mode == "int8":
        offload = ", fp32 CPU offload" if q.int8_fp32_cpu_offload else ""
        return f"8-bit LLM.int8 (threshold {q.int8_threshold}{offload}), compute {q.compute_dtype}"
    return f"none (16-bit base in {q.compute_dtype})"
