"""Quantization settings -> `transformers.BitsAndBytesConfig`, and back from a saved base.

Every bitsandbytes mode is a `quant.mode`: nf4 and fp4 (4-bit, QLoRA), int8 (LLM.int8) and none
(an unquantized 16-bit base, for comparison). A base saved already quantized by
`python -m finetune.quantize` carries its own `quantization_config` and loads only as saved;
`saved_mismatches` says where a recipe differs from it. The quant checks that need more than the
section's own fields (the devices, a saved base, the model's module names) sit here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import BitsAndBytesConfig

from finetune.config import QUANTIZED_MODES, ModelConfig, QuantConfig, is_gpu

TORCH_DTYPES = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8,
}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def build_bnb_config(q: QuantConfig, keep_unquantized: Optional[list[str]] = None) -> Optional[BitsAndBytesConfig]:
    """The bitsandbytes config for `quant.mode`; None for a 16-bit (unquantized) base.

    `keep_unquantized` are the modules transformers leaves unquantized by default (the output head,
    tied weights). transformers drops that default list as soon as `llm_int8_skip_modules` is given,
    so the user's skip modules are added to it here: skipping `down_proj` must not quantize `lm_head`.
    """
    if q.mode not in QUANTIZED_MODES:
        return None
    skip = None
    if q.int8_skip_modules:
        skip = sorted(set(q.int8_skip_modules) | set(keep_unquantized or []))
    common: dict[str, Any] = dict(
        llm_int8_skip_modules=skip,
        llm_int8_enable_fp32_cpu_offload=q.int8_fp32_cpu_offload,
    )
    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(q.int8_threshold), **common)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
        **common,
    )


def saved_quantization(folder: str | Path) -> Optional[dict[str, Any]]:
    """The `quantization_config` in a local model folder's config.json, or None (hub ids, plain bases)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return None


def saved_mode(saved: dict[str, Any]) -> Optional[str]:
    """nf4, fp4 or int8 for a bitsandbytes quantization_config; None for any other method."""
    if saved.get("quant_method") != "bitsandbytes":
        return None
    if saved.get("load_in_8bit") or saved.get("_load_in_8bit"):
        return "int8"
    if saved.get("load_in_4bit") or saved.get("_load_in_4bit"):
        return saved.get("bnb_4bit_quant_type", "fp4")
    return None


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """The quant.* fields that a saved bitsandbytes quantization_config fixes."""
    mode = saved_mode(saved)
    fields: dict[str, Any] = {"mode": mode, "int8_skip_modules": saved.get("llm_int8_skip_modules") or None}
    if mode == "int8":
        fields["int8_threshold"] = float(saved.get("llm_int8_threshold", 6.0))
    else:
        fields["double_quant"] = bool(saved.get("bnb_4bit_use_double_quant", False))
        fields["quant_storage"] = saved.get("bnb_4bit_quant_storage") or "uint8"
        fields["compute_dtype"] = saved.get("bnb_4bit_compute_dtype") or "float32"
    return fields


def quant_from_saved(q: QuantConfig, saved: dict[str, Any]) -> QuantConfig:
    """`q` with the saved quantization's settings; placement (device_map, max_memory) stays `q`'s."""
    return dataclasses.replace(q, **saved_settings(saved))


def saved_mismatches(q: QuantConfig, saved: dict[str, Any]) -> list[tuple[str, str]]:
    """(what differs, the override that fixes it) between the recipe and a saved quantization_config."""
    wanted = saved_settings(saved)
    if q.mode != wanted["mode"]:
        return [(f"saved as {wanted['mode']}, recipe quant.mode={q.mode}", f"quant.mode={wanted['mode']}")]
    out = [
        (f"saved with quant.{k}={v}, recipe {getattr(q, k)}", f"quant.{k}={str(v).lower() if isinstance(v, bool) else v}")
        for k, v in wanted.items()
        if k not in ("mode", "int8_skip_modules") and getattr(q, k) != v
    ]
    # The saved list also holds the modules transformers keeps unquantized by default (lm_head).
    saved_skip, skip = set(wanted["int8_skip_modules"] or []), set(q.int8_skip_modules or [])
    if bool(saved_skip) != bool(skip) or not skip <= saved_skip:
        listed = "[" + ",".join(sorted(saved_skip)) + "]" if saved_skip else "null"
        out.append((f"saved with quant.int8_skip_modules={listed}, recipe {sorted(skip) or None}",
                    f"quant.int8_skip_modules={listed}"))
    return out


def describe(q: QuantConfig) -> str:
    """One line for the run summary."""
    skip = f", kept unquantized: {', '.join(q.int8_skip_modules)}" if q.int8_skip_modules else ""
    placement = ""
    if q.device_map or q.max_memory:
        placement = ", placed by quant.device_map" if q.device_map else ", placed by quant.max_memory"
        placement += " (CPU modules unquantized)" if q.int8_fp32_cpu_offload else ""
    if q.mode in ("nf4", "fp4"):
        dq = "double-quant" if q.double_quant else "single-quant"
        return f"4-bit {q.mode.upper()}, {dq}, compute {q.compute_dtype}, storage {q.quant_storage}{skip}{placement}"
    if q.mode == "int8":
        outliers = f"outlier threshold {q.int8_threshold:g}" if q.int8_threshold > 0 else "no outlier decomposition"
        return f"8-bit LLM.int8 ({outliers}), compute {q.compute_dtype}{skip}{placement}"
    return f"none (unquantized base in {q.compute_dtype}){placement}"


class _OnceFilter(logging.Filter):
    """Let a log message through the first time only."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def quiet_repeated_int8_cast_warning() -> None:
    """Show bitsandbytes' "inputs will be cast to float16" warning once, not on every int8 matmul.

    LLM.int8 quantizes activations from fp16 by design, so with bf16 or fp32 compute bitsandbytes
    warns on every call of every 8-bit layer; once is informative, thousands bury the training log.
    """
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


# --- checks beside the builder: device facts, a saved base's own settings, module names ------------


def placement_problems(q: QuantConfig, *, cuda_available: bool) -> list[str]:
    """Problems of quant.device_map / max_memory / int8_fp32_cpu_offload that depend on the devices."""
    p: list[str] = []
    quantized = q.mode in QUANTIZED_MODES
    devices = list((q.device_map or {}).values())
    on_cpu = [d for d in devices if str(d) == "cpu"]
    on_gpu = [d for d in devices if is_gpu(d)]
    if on_gpu and not cuda_available:
        p.append("quant.device_map places modules on a GPU, but no GPU is visible; drop quant.device_map to train on the CPU")
    if quantized and on_cpu and on_gpu and not q.int8_fp32_cpu_offload:
        p.append(
            "quant.device_map splits the base between a GPU and the CPU: transformers loads a quantized base "
            "split that way only with quant.int8_fp32_cpu_offload=true, which keeps the CPU modules unquantized"
        )
    if q.int8_fp32_cpu_offload:
        if not quantized:
            p.append("quant.int8_fp32_cpu_offload keeps CPU modules out of quantization, but quant.mode=none quantizes "
                     "nothing; remove it")
        elif not cuda_available:
            p.append(
                "quant.int8_fp32_cpu_offload splits the base between a GPU and the CPU, but no GPU is visible "
                "(on the CPU the whole base is on the CPU already); remove it and quant.device_map / quant.max_memory"
            )
        elif not q.device_map:
            p.append(
                "quant.int8_fp32_cpu_offload needs quant.device_map naming the modules that go to the CPU"
                + (
                    " (with quant.max_memory alone, transformers quantizes every layer before it decides the "
                    "placement, so nothing would stay unquantized)" if q.max_memory else ""
                )
            )
        elif not on_cpu:
            p.append("quant.int8_fp32_cpu_offload is set but quant.device_map sends no module to 'cpu'")
    return p


def saved_quantization_problems(q: QuantConfig, m: ModelConfig) -> list[str]:
    """A base saved already quantized loads as it was saved; the recipe must say the same settings.

    Requiring a match (rather than silently taking the folder's settings) keeps `quant.*` a true
    record of the loaded base in the summary, the adapter manifest and resume fingerprints.
    """
    folder = m.name_or_path
    saved = saved_quantization(folder) if not m.random_init and os.path.isdir(folder) else None
    if not saved:
        return []
    if saved_mode(saved) is None:
        return [
            f"model.name_or_path={folder!r} is quantized with {saved.get('quant_method', 'an unknown method')!r}; "
            "finetune loads bitsandbytes bases only (save one with `python -m finetune.quantize`)"
        ]
    mismatches = saved_mismatches(q, saved)
    if not mismatches:
        return []
    return [
        f"model.name_or_path={folder!r} holds a base saved already quantized, and it loads only as saved, but "
        f"the recipe differs: {'; '.join(m for m, _ in mismatches)}. Add `{' '.join(o for _, o in mismatches)}`, "
        "or point model.name_or_path at the unquantized base"
    ]


def quant_problems(q: QuantConfig, m: ModelConfig, *, cuda_available: bool) -> list[str]:
    """Every quant.* problem that needs no model: its own fields, placement on these devices, a saved base."""
    return q.problems() + saved_quantization_problems(q, m) + placement_problems(q, cuda_available=cuda_available)


def _matches_module(pattern: str, name: str) -> bool:
    """transformers' rule for skip modules: a path prefix at a module boundary, a regex, or a suffix."""
    try:
        if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name):
            return True
    except re.error:
        pass
    return name.endswith(pattern)


def quant_module_problems(q: QuantConfig, module_names: list[str]) -> list[str]:
    """Problems with quant.* settings that need the model's module names (read from a weightless copy)."""
    p: list[str] = []
    named = [n for n in module_names if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in named})
    for pattern in q.int8_skip_modules or []:
        if not any(_matches_module(pattern, n) for n in named):
            hint = difflib.get_close_matches(pattern, leaves, n=1)
            p.append(
                f"quant.int8_skip_modules has '{pattern}', which matches no module of this model"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + "; give a leaf name (down_proj) or a module path (model.layers.0)"
            )
    for name in q.device_map or {}:
        if name and name not in module_names:
            hint = difflib.get_close_matches(name, named, n=1)
            p.append(
                f"quant.device_map names '{name}', which is not a module of this model"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
            )
    return p


def device_map_problems(model, device_map: dict[str, Any]) -> list[str]:
    """Parameters of `model` (a meta copy) that quant.device_map gives no device, as a config problem."""
    keys = list(device_map)
    missing = [
        name for name, _ in model.named_parameters(remove_duplicate=False)
        if not any(k == "" or name == k or name.startswith(k + ".") for k in keys)
    ]
    if not missing:
        return []
    modules = sorted({n.rsplit(".", 1)[0] for n in missing})
    shown = ", ".join(modules[:6]) + (f" and {len(modules) - 6} more" if len(modules) > 6 else "")
    return [f"quant.device_map gives no device to {shown}: add them (or a parent module; \"\" covers the whole model)"]
