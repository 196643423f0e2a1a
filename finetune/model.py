"""Load the frozen, quantized base; prepare it for k-bit training; attach or load LoRA adapters."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from finetune.alibi import FUSED_ALIBI_IMPLEMENTATIONS, fused_alibi_problems, use_fused_alibi_attention
from finetune.config import Config, ConfigError, ModelConfig, QuantConfig, default_cache_dir
from finetune.embedded import ensure_embedded_model, is_embedded
from finetune.quant import (
    build_bnb_config,
    quant_from_saved,
    quiet_repeated_int8_cast_warning,
    saved_quantization,
    torch_dtype,
)
from finetune.recompute import checkpoint_inside, keep_matmul_outputs


def resolve_model_source(m: ModelConfig, cache_dir: Path, seed: int = 0) -> str:
    """The folder or hub id that weights are loaded from.

    Embedded models are converted once into the cache; `random_init` models are built from
    `architecture` with random weights, saved once into the cache, and then loaded through the same
    quantizing `from_pretrained` path as real checkpoints (transformers can only quantize on load).
    """
    if m.random_init:
        return str(_random_model_dir(m, cache_dir, seed))
    if is_embedded(m.name_or_path):
        return str(ensure_embedded_model(m.name_or_path, cache_dir))
    return m.name_or_path


def _architecture_config(m: ModelConfig):
    if m.architecture:
        arch = dict(m.architecture)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    return AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)


def _random_model_dir(m: ModelConfig, cache_dir: Path, seed: int) -> Path:
    config = _architecture_config(m)
    key = hashlib.sha256((config.to_json_string() + f"seed={seed}").encode()).hexdigest()[:16]
    target = cache_dir / "random" / f"{config.model_type}-{key}"
    if (target / "config.json").exists():
        return target
    torch.manual_seed(seed)
    staged = target.with_name(target.name + ".tmp")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(staged)
    staged.rename(target)
    return target


def base_config(source: str, m: ModelConfig):
    """The base model's transformers config (read from `source`, or built from model.architecture)."""
    if m.random_init:
        return _architecture_config(m)
    return AutoConfig.from_pretrained(source, revision=m.revision, trust_remote_code=m.trust_remote_code)


def meta_model(source: str, m: ModelConfig, dtype: Optional[torch.dtype] = None):
    """A weightless (meta-device) copy of the model: its modules and shapes, no memory, no weights read."""
    config = base_config(source, m)
    # A base saved already quantized keeps its quantization_config; the copy must be plain.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code, **({"dtype": dtype} if dtype else {}))


def module_names(source: str, m: ModelConfig) -> list[str]:
    """Module names of the model, read from a weightless (meta-device) copy: no weights load."""
    return [name for name, _ in meta_model(source, m).named_modules()]


def kept_unquantized_by_default(model) -> list[str]:
    """The modules transformers leaves unquantized on its own: the output head and tied weights."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return get_keys_to_not_convert(model)


def accepts_position_ids(source: str, m: ModelConfig) -> bool:
    """Whether the model's forward takes position ids, which packed rows need to keep examples apart."""
    import inspect

    return "position_ids" in inspect.signature(type(meta_model(source, m)).forward).parameters


def load_tokenizer(m: ModelConfig, source: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        m.tokenizer or source, revision=m.revision, trust_remote_code=m.trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"the tokenizer of {m.tokenizer or source} has neither a pad nor an eos token; "
                "name a tokenizer that has one with model.tokenizer=..."
            )
        # Padding positions carry label -100 and attention 0, so reusing eos as pad is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def load_base(cfg: Config, source: str, device: torch.device):
    """The frozen base model, quantized on load as `quant.mode` says.

    A folder saved already quantized (`python -m finetune.quantize`) loads with the quantization_config
    it was saved with; check_config has made sure the recipe's quant.* says the same.
    """
    m, q = cfg.model, cfg.quant
    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(q.compute_dtype),
        device_map=device_map_for(q, device),
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
    if fused_alibi and (problems := fused_alibi_problems(config, attention)):
        raise ConfigError(problems)
    if attention:
        kwargs["attn_implementation"] = "eager" if fused_alibi else attention
    if q.device_map:
        # accelerate would say only "does not give any device for lm_head.weight", after the model is built.
        problems = device_map_problems(meta_model(source, m), q.device_map)
        if problems:
            raise ConfigError(problems)
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


def lora_config(cfg: Config) -> LoraConfig:
    lo = cfg.lora
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


def upcast_frozen_weights(model, cfg: Config):
    """peft's k-bit recipe: non-quantized frozen weights (norms, embeddings, head) to fp32, if asked."""
    if cfg.quant.mode != "none" and cfg.speed.fp32_frozen:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def prepare_for_training(model, cfg: Config):
    """Make the base trainable through adapters: k-bit prep, gradient checkpointing, LoRA."""
    model.requires_grad_(False)
    model = upcast_frozen_weights(model, cfg)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and is what torch recommends.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        keep_activations_of_last_blocks(model, cfg.speed.blocks_without_checkpointing)
    model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    model = get_peft_model(model, lora_config(cfg))
    place_offloaded_adapters(model)
    if cfg.quant.compute_dtype != "float32":
        # Training runs under autocast, which casts a LoRA matmul's inputs itself; peft's own cast of
        # every adapter input to the fp32 adapter dtype only adds a full copy of the activations per
        # adapter. (Generation of samples must then also run under autocast.)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The repeated decoder blocks: the longest ModuleList whose members share one class."""
    blocks = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
         and len({type(b) for b in m}) == 1),
        key=len, default=None,
    )
    return list(blocks or [])


def keep_activations_of_last_blocks(model, count: int) -> None:
    """Turn gradient checkpointing off for the last `count` decoder blocks (speed.blocks_without_checkpointing)."""
    if count == 0:
        return
    blocks = [b for b in decoder_blocks(model) if getattr(b, "gradient_checkpointing", False)]
    if count > len(blocks):
        raise ConfigError([
            f"speed.blocks_without_checkpointing={count} but the model has {len(blocks)} checkpointed decoder "
            f"blocks; use a number from 0 to {len(blocks)} (or train.gradient_checkpointing=false for none)"
        ])
    for block in blocks[len(blocks) - count:]:
        block.gradient_checkpointing = False
        block.finetune_without_checkpointing = True  # compile_blocks gives these their own policy


def checkpointing_of(block) -> str:
    """A block's gradient checkpointing as prepare_for_training set it (read it before compile_blocks,
    which takes checkpointing over): "checkpointed", "without checkpointing"
    (speed.blocks_without_checkpointing) or "none" (train.gradient_checkpointing=false)."""
    if getattr(block, "gradient_checkpointing", False):
        return "checkpointed"
    return "without checkpointing" if getattr(block, "finetune_without_checkpointing", False) else "none"


# Batch widths of compiled runs are padded to a multiple of this (finetune.loop's collator, bench.py).
COMPILED_WIDTH_MULTIPLE = 128


def batch_width_multiple(compiled: bool, one_width: bool, max_length: int) -> Optional[int]:
    """What batch widths are padded to a multiple of. Compiled blocks (speed.compile) compile once per
    width (compile_blocks): multiples of 128 tokens bound the compiles to max_length / 128. With
    `one_width` (packed rows, or speed.cuda_graphs) every batch is padded to max_length: packed rows
    are nearly full anyway and compile once (four widths of packed llama3-8b rows cost 150 s of
    compiling on the H100), and CUDA graphs record one graph (with four widths they kept recording:
    481 tokens/s against 9,624 without them)."""
    if not compiled:
        return None
    return max_length if one_width else COMPILED_WIDTH_MULTIPLE


def compile_blocks(model, cuda_graphs: bool = False, max_length: int = 2048) -> int:
    """torch.compile each repeated decoder block in place; returns how many were compiled.

    Regional compilation: the blocks share one class, so the first compile is reused by the rest.
    In place (`Module.compile`), unlike accelerate's `compile_regions`, which rebuilds the modules
    and so renames the adapter weights in the state dict that PEFT saves. Checkpointing moves inside
    the compiled blocks (finetune.recompute): checkpointed blocks recompute only what backward needs,
    the others (speed.blocks_without_checkpointing) keep their matmul and attention outputs only.

    Compiled for static shapes, once per batch width (padded to batch_width_multiple): with symbolic
    widths torch 2.11's partitioner fails on these checkpointed blocks ("Node add_1077 was invalid,
    but is output", on the H100 for every kind of block and attention, while fixed widths compile).
    Dynamo's recompile limit (8 graphs per code) is raised to hold every width, for training and
    evaluation, both kinds of block, a short last batch, and batches with and without padding (SDPA
    gets no mask without padding); past it blocks would run eagerly.
    """
    blocks = decoder_blocks(model)
    # Without train.gradient_checkpointing no block is either: those compile as they are.
    checkpointed = [b for b in blocks if checkpointing_of(b) == "checkpointed"]
    without = [b for b in blocks if checkpointing_of(b) == "without checkpointing"]
    checkpoint_inside(checkpointed, keep=None)
    if without:
        ranks = {int(r) for c in getattr(model, "peft_config", {}).values() for r in [c.r, *c.rank_pattern.values()]}
        checkpoint_inside(without, keep=keep_matmul_outputs(frozenset(ranks)))
    widths = -(-max_length // COMPILED_WIDTH_MULTIPLE)
    graphs = 2 * 2 * 2 * 2 * widths  # (training, evaluation) x kinds of block x (full, short batch) x (mask, none)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 2 * graphs)
    for block in blocks:
        block.compile(mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    return len(blocks)


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
    """(trainable, total) parameters, counting each 4-bit packed weight as its real element count."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)


def load_adapter(
    adapter_or_run_dir: str | Path,
    *,
    device: Optional[torch.device] = None,
    cache_dir: Optional[Path] = None,
    is_trainable: bool = False,
    base: Optional[str | Path] = None,
):
    """Return (quantized base with the saved adapter, tokenizer, run config).

    Accepts a run folder (uses its final adapter) or an adapter folder written by finetune; the
    base is rebuilt with the same model and quantization settings recorded at training time.
    `base` loads the adapter onto another copy of the same architecture instead: a base saved
    already quantized by `python -m finetune.quantize` (loaded as saved), or the unquantized base
    an adapter trained on a saved one came from (quantized on the fly with the recorded settings).
    """
    from finetune.checkpoint import read_adapter_manifest, resolve_adapter_dir

    adapter_dir = resolve_adapter_dir(Path(adapter_or_run_dir))
    manifest = read_adapter_manifest(adapter_dir)
    cfg = manifest.config
    if base is not None:
        cfg.model = dataclasses.replace(cfg.model, name_or_path=str(base), random_init=False)
    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    source = resolve_model_source(cfg.model, cache_dir or default_cache_dir(), seed=cfg.train.seed)
    saved = saved_quantization(source)
    if saved is not None:
        # A saved base loads as it was saved; the recorded quant.* may describe another mode.
        cfg.quant = quant_from_saved(cfg.quant, saved)
    tokenizer = load_tokenizer(cfg.model, source)
    base_model = load_base(cfg, source, device)
    # The same upcast of frozen weights as in training, so the reloaded model computes exactly what
    # the trained one did.
    base_model = upcast_frozen_weights(base_model, cfg)
    if is_trainable and cfg.train.gradient_checkpointing:
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    model.eval()
    return model, tokenizer, cfg


def describe_footprint(model) -> str:
    return f"{model.get_memory_footprint() / 2**20:,.1f} MiB"


def architecture_summary(model) -> str:
    c = model.config
    return json.dumps({k: getattr(c, k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size") if hasattr(c, k)})
