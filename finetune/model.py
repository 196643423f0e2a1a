"""The frozen quantized base and its LoRA adapters: load, prepare for k-bit training, attach.

Three steps kept apart (the original qlora.py did them in one function): `load_base` quantizes on
load as `quant.*` says; `prepare_for_training` upcasts what peft's k-bit recipe upcasts, turns on
gradient checkpointing and attaches the adapters; `build_model` composes them with the optional
speed settings (finetune.speed) for the training loop and the benchmark alike.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

from finetune.config import Config, LoraSettings, ModelConfig, QuantConfig
from finetune.quant import (
    build_bnb_config,
    quiet_repeated_int8_cast_warning,
    saved_quantization,
    torch_dtype,
)
from finetune.source import base_config, meta_model
from finetune.speed import apply_speed
from finetune.speed.alibi import FUSED_ALIBI_IMPLEMENTATIONS, use_fused_alibi_attention


def build_model(cfg: Config, source: str, device: torch.device, *, stage_on_cpu: bool = False) -> tuple[Any, int]:
    """The trainable model of a run: the quantized base, prepared, with LoRA and the speed settings.

    Returns it with the quantized base's memory footprint (before any fp32 upcast), for the summary.
    `stage_on_cpu`: quantize into CPU memory and leave the model there, for FSDP to move each rank's
    shards to `device` (see `load_base`).
    """
    model = load_base(cfg.model, cfg.quant, source, device, stage_on_cpu=stage_on_cpu)
    footprint = model.get_memory_footprint()
    model = prepare_for_training(model, cfg.lora, cfg.quant, gradient_checkpointing=cfg.train.gradient_checkpointing,
                                 fp32_frozen=cfg.speed.fp32_frozen)
    apply_speed(model, cfg.speed, cfg.data.max_length)
    return model, footprint


def kept_unquantized_by_default(model) -> list[str]:
    """The modules transformers leaves unquantized on its own: the output head and tied weights."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return get_keys_to_not_convert(model)


def device_map_for(q: QuantConfig, device: torch.device) -> Any:
    """Put the whole base on this process's device unless the recipe places modules itself."""
    if q.device_map:
        return dict(q.device_map)
    if q.max_memory:
        return "auto"
    if device.type == "cuda":
        # accelerate's single-GPU device is plain "cuda" (no index): that means the current device.
        return {"": device.index if device.index is not None else torch.cuda.current_device()}
    return {"": str(device)}


def max_memory_for(q: QuantConfig) -> dict[Any, str]:
    """quant.max_memory with GPU indices as ints (accelerate's keys); the config keeps them as strings."""
    return {int(k) if str(k).isdigit() else str(k): str(v) for k, v in (q.max_memory or {}).items()}


def load_base(m: ModelConfig, q: QuantConfig, source: str, device: torch.device, *, stage_on_cpu: bool = False):
    """The frozen base model for `device`, quantized on load as `quant.mode` says.

    A folder saved already quantized (`python -m finetune.quantize`) loads with the quantization_config
    it was saved with; the preflight has made sure the recipe's quant.* says the same.
    With `stage_on_cpu` the weights are quantized tensor by tensor into CPU memory (bitsandbytes
    quantizes on the CPU too) and stay there: under FSDP, `fully_shard` then moves one decoder block
    at a time to the GPU and keeps only this rank's shard, so no GPU ever holds the whole base.
    """
    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(q.compute_dtype),
        device_map=device_map_for(q, torch.device("cpu") if stage_on_cpu else device),
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
    )
    if q.max_memory:
        kwargs["max_memory"] = max_memory_for(q)
    config = base_config(source, m)
    model_type = config.model_type
    attention = m.attn_implementation or ("sdpa" if model_type == "bloom" else None)
    if attention == "flex_attention" and device.type == "cpu":
        # torch has no FlexAttention backward on the CPU; sdpa computes the same attention.
        print("[finetune] model.attn_implementation=flex_attention has no backward on the CPU; using sdpa", flush=True)
        attention = "sdpa"
    # transformers has only an eager attention for BLOOM; ours takes its place after loading.
    fused_alibi = attention in FUSED_ALIBI_IMPLEMENTATIONS and model_type == "bloom"
    if attention:
        kwargs["attn_implementation"] = "eager" if fused_alibi else attention
    if saved_quantization(source) is None:
        keep = kept_unquantized_by_default(meta_model(source, m)) if q.int8_skip_modules else None
        bnb = build_bnb_config(q, keep)
        if bnb is not None:
            kwargs["quantization_config"] = bnb
    if q.mode == "int8":
        quiet_repeated_int8_cast_warning()
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if fused_alibi:
        use_fused_alibi_attention(model, attention)
    model.requires_grad_(False)
    keep_cpu_4bit_weights_trainable(model)
    return model


def keep_cpu_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 converts a Linear4bit weight to a packed layout the
    first time the layer runs in eval mode without grad, and keeps it: every later forward, in
    training too, then goes through `gemv_4bit`, which has no autograd formula, so no gradient
    reaches the layers below (the LoRA adapters of earlier layers stop learning). An eval pass or a
    sample before training would trigger it, so the packing is switched off.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def lora_config(lo: LoraSettings) -> LoraConfig:
    targets: Any = "all-linear" if list(lo.target_modules) == ["all-linear"] else list(lo.target_modules)
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=targets,
        modules_to_save=list(lo.modules_to_save) or None,
        bias=lo.bias,
        use_rslora=lo.use_rslora,
        task_type="CAUSAL_LM",
    )


def upcast_frozen_weights(model, q: QuantConfig, fp32_frozen: bool):
    """peft's k-bit recipe: non-quantized frozen weights (norms, embeddings, head) to fp32, if asked."""
    if q.mode != "none" and fp32_frozen:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def prepare_for_training(model, lora: LoraSettings, q: QuantConfig, *, gradient_checkpointing: bool,
                         fp32_frozen: bool):
    """Make the base trainable through adapters: k-bit prep, gradient checkpointing, LoRA."""
    model.requires_grad_(False)
    model = upcast_frozen_weights(model, q, fp32_frozen)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and is what torch recommends.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    model = get_peft_model(model, lora_config(lora))
    place_offloaded_adapters(model)
    if q.compute_dtype != "float32":
        # Training runs under autocast, which casts a LoRA matmul's inputs itself; peft's own cast of
        # every adapter input to the fp32 adapter dtype only adds a full copy of the activations per
        # adapter. (Generation of samples must then also run under autocast.)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def place_offloaded_adapters(model) -> int:
    """Give the adapters of CPU-offloaded layers real weights on the GPU; returns how many moved.

    With quant.int8_fp32_cpu_offload, accelerate keeps the weights of the layers that quant.device_map
    sends to the CPU on the meta device and streams them to the GPU for each forward (a hook on each
    such layer). PEFT creates a layer's adapters on its base weight's device, so theirs would be meta
    tensors without values and the backward pass would fail. Adapters are small: they are created on
    the hook's execution device, initialised as PEFT initialises them, and stay there.
    """
    from peft.tuners.lora import LoraLayer

    moved = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        device = getattr(getattr(module.get_base_layer(), "_hf_hook", None), "execution_device", None)
        for name in list(module.lora_A.keys()):
            if device is None or not module.lora_A[name].weight.is_meta:
                continue
            module.lora_A[name].to_empty(device=device)
            module.lora_B[name].to_empty(device=device)
            module.reset_lora_parameters(name, init_lora_weights=model.peft_config[name].init_lora_weights)
            moved += 1
    return moved


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting each 4-bit packed weight as its real element count, and
    an input embedding matrix moved to host memory (speed.offload_embeddings), no longer a parameter."""
    trainable, total = model.get_nb_trainable_parameters()
    host = sum(m.finetune_table.numel() for m in model.modules() if hasattr(m, "finetune_table"))
    return int(trainable), int(total) + host
