"""Memory of a base in every quantization mode, and a recipe's training peak, before anything loads.

    python -m finetune.footprint recipe=bloom_nf4 [key=value ...] [measure=true] [world_size=N] [longest_in=GiB]

prints a table of the base's footprint per mode (nf4, fp4, int8, none) and an estimate of the
training peak for the recipe as composed, so a user knows whether it fits before launching.
`measure=true` also loads the base in each mode and prints the real figures beside the estimate.
`longest_in=80` prints the longest data.max_length whose estimated peak fits in 80 GiB.

Weights are counted from a weightless (meta-device) copy of the model on which transformers' own
bitsandbytes quantizer has swapped the layers, so the same modules are quantized as in a real load:

    quantized 4-bit linear (n = in x out)   n/2 bytes packed, plus per 64-weight block an absmax:
                                            fp32 (4 B), or with double quantization 1 B plus an fp32
                                            per 256 blocks and a 256-entry fp32 code (1 KiB) a layer
    quantized int8 linear                   n bytes, plus one fp32 scale per output row (SCB)
    everything else (embeddings, norms,     its parameters and buffers in quant.compute_dtype
      output head, biases, skip modules)

`get_memory_footprint()` counts parameters and buffers only; the quantization constants above
live outside them (in `quant_state` / `SCB`), so they are reported as a column of their own.

The training peak is the sum of

    base weights    the footprint above, with every unquantized parameter upcast to fp32 by
                    peft's prepare_model_for_kbit_training (quantized modes, speed.fp32_frozen);
                    with speed.offload_embeddings less the input embeddings (vocab x hidden)
    LoRA            trainable parameters x (4 B weight + 4 B gradient + optimizer state: 8 B for
                    AdamW and paged 32-bit AdamW, 2 B for the 8-bit variants)
    checkpoints     with gradient checkpointing, each layer's input is kept:
                    layers x batch x seq x hidden x (4 B when the upcast made the residual stream
                    fp32; 2 B otherwise)
    one layer       the activations of the layer being recomputed in the backward pass,
                    batch x seq x (15 x hidden + 5 x intermediate) x 2 B (Korthikanti et al. 2022:
                    34 x hidden for intermediate = 4 x hidden; no seq^2 term with SDPA attention),
                    plus 5 copies of the residual stream in its own dtype (the input, the two
                    residual sums and the norms' fp32 work: fitted to measured peaks),
                    plus a dropped copy of each adapted layer's input when lora.dropout > 0;
                    without checkpointing every layer's. With speed.mlp_chunk_size the
                    5 x intermediate part counts one slice's tokens; with
                    speed.offload_checkpoints the checkpoints live in CPU memory, two on the GPU
    logits          batch x seq x vocab x 12 B: the fp32 copy the loss is computed in, the saved
                    log-softmax and its gradient (the bf16 logits are freed by then). With bloom's
                    250,880-token vocabulary this term dominates. With the chunked loss
                    (speed.loss_chunk_size > 0) only one chunk's: chunk x vocab x 10 B, plus the
                    gradient w.r.t. the hidden states it keeps (batch x seq x hidden x 2 B)
    int8 inputs     LLM.int8 layers keep their input for backward as a plain attribute of the
                    autograd context, which non-reentrant gradient checkpointing cannot free:
                    batch x seq x (in_features summed over all int8 layers) x 4 B (fp32 inputs:
                    autocast runs the norms in fp32). Measured on an H100: 2.95 GiB for bloom-1b7 at
                    4 x 512 tokens, this term says 2.63 GiB.
    head copy       the bf16 copy of an fp32 output head that the head's matmul runs with:
                    vocab x hidden x 2 B (when the unquantized weights were upcast)

with batch = train.batch_size and seq = data.max_length (the longest a batch can be padded to).

Per rank with several processes (`world_size=N`): under DDP each rank holds all of the above. Under
FSDP (`dist=fsdp`) each rank holds 1/N of the parameters (the 4-bit weights too: stored as
bfloat16), of the LoRA gradients and of the optimizer state, plus what FSDP gathers whole for the
computation: two decoder blocks (the one running and the next, prefetched) and the output head in
bf16 (kept from the end of the forward to the start of the backward). The 4-bit constants live
outside the parameters (in `quant_state`), so every rank holds all of them. Activations are per
rank's batch and unsharded.
It leaves out the CUDA context and allocator slack (not in torch.cuda.max_memory_allocated either).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch

from finetune.cli import fail
from finetune.config import QUANT_MODES, Config, ConfigError

BLOCK_4BIT = 64  # bitsandbytes' 4-bit blocksize on CUDA and CPU
NESTED_BLOCK = 256  # double quantization: absmax values per nested block
OPTIMIZER_BYTES = {"adamw": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
LOGIT_BYTES = 12
RESIDUAL_COPIES = 5  # residual-stream tensors a recomputed block holds in the stream's dtype (README: long context)
LOGIT_BYTES_CHUNKED = 10


@dataclass
class Footprint:
    mode: str
    weights: int  # what get_memory_footprint() reports: parameters and buffers
    quant_state: int  # bitsandbytes' quantization constants, outside get_memory_footprint
    quantized_params: int  # weights in quantized linear layers
    quantized_bytes: int  # their packed bytes plus constants
    other_param_bytes: int  # unquantized parameters (upcast to fp32 for k-bit training)
    other_params: int
    linear_bytes_unquantized: int  # what the quantized linear layers would take in compute_dtype
    int8_in_features: int = 0  # summed over the int8 linear layers (see the int8 term of the peak)

    @property
    def total(self) -> int:
        return self.weights + self.quant_state


def _dtype_bytes(name: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4}[name]


def four_bit_state_bytes(n: int, double_quant: bool) -> int:
    """Bytes of a 4-bit weight's quantization constants (absmax, nested absmax, codes, offset)."""
    blocks = math.ceil(n / BLOCK_4BIT)
    code = 16 * 4  # the 16-value fp32 NF4/FP4 code
    if not double_quant:
        return blocks * 4 + code
    return blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + 256 * 4 + 4 + code


def quantized_meta_model(cfg: Config, source: str, mode: str):
    """A meta-device copy with the layers a real load in `mode` would have (no weights, no memory)."""
    from transformers.quantizers import AutoHfQuantizer

    from finetune.model import kept_unquantized_by_default
    from finetune.quant import build_bnb_config, torch_dtype
    from finetune.source import meta_model

    q = dataclasses.replace(cfg.quant, mode=mode)
    dtype = torch_dtype(q.compute_dtype)
    model = meta_model(source, cfg.model, dtype=dtype)
    keep = kept_unquantized_by_default(model) if q.int8_skip_modules else None
    bnb = build_bnb_config(q, keep)
    if bnb is not None:
        quantizer = AutoHfQuantizer.from_config(bnb, pre_quantized=False)
        device_map = dict(q.device_map) if q.device_map else {"": "cpu"}
        # A real load builds the bnb layers under the model's dtype (their biases too), as here.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            quantizer.preprocess_model(model=model, dtype=dtype, device_map=device_map, checkpoint_files=None,
                                       use_kernels=False)
        finally:
            torch.set_default_dtype(previous)
    return model


def estimate_footprint(cfg: Config, source: str, mode: str) -> Footprint:
    """The footprint of the base in `mode`, counted from the layer shapes (see the module docstring)."""
    import bitsandbytes as bnb

    model = quantized_meta_model(cfg, source, mode)
    q = cfg.quant
    weights = quant_state = quantized_params = quantized_bytes = int8_in = 0
    quantized_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            n = module.in_features * module.out_features
            packed, state = math.ceil(n / 2), four_bit_state_bytes(n, q.double_quant)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            n = module.in_features * module.out_features
            packed, state = n, module.out_features * 4
            int8_in += module.in_features
        else:
            continue
        quantized_ids.add(id(module.weight))
        weights += packed
        quant_state += state
        quantized_params += n
        quantized_bytes += packed + state
    other_bytes = other_params = 0
    for p in model.parameters():  # parameters() counts a tied weight once, as get_memory_footprint does
        if id(p) in quantized_ids:
            continue
        other_params += p.numel()
        other_bytes += p.numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return Footprint(mode, weights + other_bytes + buffers, quant_state, quantized_params, quantized_bytes,
                     other_bytes, other_params, quantized_params * _dtype_bytes(q.compute_dtype), int8_in)


def measure_footprint(model) -> tuple[int, int]:
    """(get_memory_footprint(), bytes of bitsandbytes' quantization constants) of a loaded base."""
    import bitsandbytes as bnb

    def nbytes(t: Optional[torch.Tensor]) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    state = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state is not None:
            qs = module.weight.quant_state
            state += nbytes(qs.absmax) + nbytes(qs.code) + nbytes(getattr(qs, "offset", None))
            if qs.nested:
                state += nbytes(qs.state2.absmax) + nbytes(qs.state2.code)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            state += nbytes(module.state.SCB if module.state.SCB is not None else getattr(module.weight, "SCB", None))
    return model.get_memory_footprint(), state


@dataclass
class PeakEstimate:
    parts: list[tuple[str, int]]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)


def lora_parameter_count(cfg: Config, source: str) -> int:
    """Trainable parameters of the recipe's LoRA, counted by PEFT on a meta-device copy."""
    from peft import get_peft_model

    from finetune.model import lora_config
    from finetune.source import meta_model

    trainable, _ = get_peft_model(meta_model(source, cfg.model), lora_config(cfg.lora)).get_nb_trainable_parameters()
    return int(trainable)


_MODEL_FACTS: dict[str, tuple[Any, int]] = {}


def _model_facts(cfg: Config, source: str) -> tuple[Any, int]:
    """(text config, LoRA parameter count) of a recipe, built once per model and LoRA settings
    (`longest_sequence` estimates many lengths of one recipe)."""
    from finetune.source import meta_model

    key = repr((source, cfg.model, cfg.lora))
    if key not in _MODEL_FACTS:
        _MODEL_FACTS[key] = _text_config(meta_model(source, cfg.model)), lora_parameter_count(cfg, source)
    return _MODEL_FACTS[key]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def estimate_training_peak(cfg: Config, source: str, footprint: Optional[Footprint] = None,
                           world_size: int = 1) -> PeakEstimate:
    """The recipe's training peak on one rank of `world_size`, part by part (module docstring: each formula)."""

    q, t, lo = cfg.quant, cfg.train, cfg.lora
    speed = getattr(cfg, "speed", None)
    fp = footprint or estimate_footprint(cfg, source, q.mode)
    # peft's k-bit recipe upcasts every unquantized parameter (not the buffers) to fp32.
    upcast = q.mode != "none" and getattr(speed, "fp32_frozen", True)
    chunk = getattr(speed, "loss_chunk_size", 0) if not lo.modules_to_save else 0
    c, lora = _model_facts(cfg, source)
    hidden, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * hidden
    batch, seq = t.batch_size, cfg.data.max_length
    tokens = batch * seq

    weights = fp.total + (fp.other_params * 4 - fp.other_param_bytes if upcast else 0)
    residual = 4 if upcast else _dtype_bytes(q.compute_dtype)
    # speed.mlp_chunk_size: the MLP's intermediates exist for one slice of the sequence at a time.
    mlp_chunk = getattr(speed, "mlp_chunk_size", 0)
    mlp_tokens = batch * min(mlp_chunk, seq) if mlp_chunk else tokens
    one_layer = (tokens * 15 * hidden + mlp_tokens * 5 * inter) * 2 + tokens * RESIDUAL_COPIES * hidden * residual
    if lo.dropout > 0:
        # lora_dropout keeps a dropped copy of each adapted layer's input: about 3 x hidden + inter a layer.
        one_layer += (tokens * 3 * hidden + mlp_tokens * inter) * 2
    fsdp = getattr(getattr(cfg, "dist", None), "strategy", "auto") == "fsdp"
    n = world_size if fsdp else 1
    if fsdp:
        block = (fp.quantized_bytes - fp.quant_state) // layers  # one block's packed 4-bit weights
        parts = [
            (f"base weights, 1/{n} of the parameters" + (" (unquantized upcast to fp32)" if upcast else ""),
             (weights - fp.quant_state) // n),
            ("4-bit constants, whole on every rank (outside the parameters)", fp.quant_state),
            ("two decoder blocks gathered whole (running + prefetched)", 2 * block),
            (f"output head gathered in bf16 ({vocab:,} x {hidden} x 2 B)", vocab * hidden * 2),
        ]
    elif getattr(speed, "offload_embeddings", False):
        table = vocab * hidden * (4 if upcast else _dtype_bytes(q.compute_dtype))
        # The batch's rows sent to the GPU are the first block's input: the checkpoint term counts them.
        parts = [("base weights" + (" (unquantized parameters upcast to fp32)" if upcast else "")
                  + f", less the input embeddings ({_gib(table)} in pinned CPU memory)", weights - table)]
    else:
        parts = [("base weights" + (" (unquantized parameters upcast to fp32)" if upcast else ""), weights)]
    shard = f", 1/{n} per rank" if n > 1 else ""
    parts += [
        (f"LoRA parameters + gradients, fp32 ({lora:,} parameters{shard})", lora * 8 // n),
        (f"optimizer state ({t.optimizer}{shard})", lora * OPTIMIZER_BYTES.get(t.optimizer, 8) // n),
    ]
    if t.gradient_checkpointing and getattr(speed, "offload_checkpoints", False):
        parts += [
            (f"layer checkpoints: in pinned CPU memory ({_gib(layers * tokens * hidden * residual)} of host memory), "
             f"two on the GPU in transit", 2 * tokens * hidden * residual),
            ("one layer's activations, recomputed in backward", one_layer),
        ]
    elif t.gradient_checkpointing:
        parts += [
            (f"layer checkpoints ({layers} x {batch} x {seq} x {hidden} x {residual} B)", layers * tokens * hidden * residual),
            ("one layer's activations, recomputed in backward", one_layer),
        ]
        if fp.int8_in_features:
            parts.append(("int8 layer inputs kept through checkpointing (bitsandbytes keeps them on ctx)",
                          tokens * fp.int8_in_features * 4))
    else:
        parts.append((f"activations of all {layers} layers (no gradient checkpointing)", layers * one_layer))
    if chunk:
        # finetune.loss: bf16 logits, their fp32 copy and log-softmax for one chunk at a time, plus the
        # gradient w.r.t. the hidden states it stores for backward.
        rows = min(chunk, tokens)
        parts.append((f"chunked loss ({rows} tokens x {vocab:,} x {LOGIT_BYTES_CHUNKED} B, speed.loss_chunk_size)",
                      rows * vocab * LOGIT_BYTES_CHUNKED + tokens * hidden * 2))
    else:
        parts.append((f"logits and loss ({batch} x {seq} x {vocab:,} x {LOGIT_BYTES} B)", tokens * vocab * LOGIT_BYTES))
    if upcast and not fsdp:  # under FSDP the head is gathered in bf16 (above)
        parts.append((f"bf16 copy of the fp32 output head ({vocab:,} x {hidden} x 2 B)", vocab * hidden * 2))
    return PeakEstimate(parts)


def longest_sequence(cfg: Config, source: str, footprint: Footprint, world_size: int, budget: int,
                     step: int = 1024) -> int:
    """The longest data.max_length, a multiple of `step`, whose estimated peak fits in `budget` bytes (0: none)."""
    def fits(length: int) -> bool:
        at = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=length))
        return estimate_training_peak(at, source, footprint, world_size).total <= budget

    if not fits(step):
        return 0
    low, high = step, 2 * step  # fits(low) holds; grow high until it does not
    while fits(high):
        low, high = high, 2 * high
    while high - low > step:
        middle = (low + high) // 2 // step * step
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def footprint_table(rows: list[Footprint], measured: Optional[dict[str, tuple[int, int]]] = None) -> str:
    """A markdown table: footprint per mode and its ratio to the unquantized base."""
    base = next((r for r in rows if r.mode == "none"), rows[0])
    head = "| mode | get_memory_footprint | + quant constants | total | vs none | quantized linears vs none |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if measured:
        head += " measured get_memory_footprint | measured constants |"
        rule += "---:|---:|"
    lines = [head, rule]
    for r in rows:
        lin = f"{r.linear_bytes_unquantized / r.quantized_bytes:.2f}x smaller" if r.quantized_params else "-"
        line = (f"| {r.mode} | {_mib(r.weights)} | {_mib(r.quant_state)} | {_mib(r.total)} | "
                f"{base.total / r.total:.2f}x smaller | {lin} |")
        if measured:
            w, s = measured.get(r.mode, (0, 0))
            line += f" {_mib(w)} | {_mib(s)} |"
        lines.append(line)
    return "\n".join(lines)


def _parse_args(argv: list[str]) -> tuple[list[str], bool, int, Optional[float]]:
    """(config overrides, measure=, world_size=, longest_in=): the last three are this tool's own arguments."""
    overrides, measure, world_size, longest_in = [], False, 1, None
    for item in argv:
        if item.startswith("longest_in="):
            value = item.split("=", 1)[1].lower().removesuffix("gib")
            try:
                longest_in = float(value)
            except ValueError:
                fail("footprint", f"{item}: give the GPU memory in GiB, e.g. longest_in=80")
        elif item.startswith("measure="):
            measure = item.split("=", 1)[1].lower() in ("1", "true", "yes")
        elif item.startswith("world_size="):
            value = item.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                fail("footprint", f"world_size={value!r}: give the number of ranks, e.g. world_size=4")
            world_size = int(value)
        else:
            overrides.append(item)
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides.append("output_dir=runs/footprint")  # composing needs one; nothing is written
    return overrides, measure, world_size, longest_in


def main(argv: Optional[list[str]] = None) -> None:
    from finetune.model import load_base
    from finetune.quant import quant_module_problems, quant_problems
    from finetune.run import compose
    from finetune.source import default_cache_dir, module_names, resolve_model_source

    overrides, measure, world_size, longest_in = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(overrides)
    except ConfigError as e:
        fail("footprint", f"{e}")
    cuda = torch.cuda.is_available()
    # Only the checks the estimate depends on, as on the GPU the recipe is meant for: a footprint is
    # often estimated on another machine than the one that will train.
    problems = quant_problems(cfg.quant, cfg.model, cuda_available=True)
    # A random-weights model is described by its architecture alone: build its weights only to measure.
    needs_weights = measure or not cfg.model.random_init
    source = resolve_model_source(cfg.model, default_cache_dir(), seed=cfg.train.seed) if needs_weights else ""
    problems += quant_module_problems(cfg.quant, module_names(source, cfg.model))
    if problems:
        fail("footprint", f"{ConfigError(problems)}")

    rows = [estimate_footprint(cfg, source, mode) for mode in QUANT_MODES]
    measured: dict[str, tuple[int, int]] = {}
    if measure:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        for mode in QUANT_MODES:
            model = load_base(cfg.model, dataclasses.replace(cfg.quant, mode=mode), source, device)
            measured[mode] = measure_footprint(model)
            del model
    none = rows[-1]
    print(f"\nfootprint of {cfg.model.name_or_path} ({none.other_params + none.quantized_params:,} parameters, "
          f"{rows[0].quantized_params:,} of them in quantizable linear layers), compute {cfg.quant.compute_dtype}\n")
    print(footprint_table(rows, measured or None))
    mine = next(r for r in rows if r.mode == cfg.quant.mode)
    peak = estimate_training_peak(cfg, source, mine, world_size)
    ranks = "" if world_size == 1 else (f", per rank of {world_size} "
                                        f"({'FSDP' if cfg.dist.strategy == 'fsdp' else 'DDP'})")
    print(f"\ntraining peak estimate for this recipe{ranks}: quant.mode={cfg.quant.mode}, batch {cfg.train.batch_size} x "
          f"{cfg.data.max_length} tokens, LoRA r={cfg.lora.r} on {', '.join(cfg.lora.target_modules)}, "
          f"gradient checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}\n")
    width = max(len(name) for name, _ in peak.parts)
    for name, size in peak.parts:
        print(f"  {name:<{width}}  {_gib(size):>12}")
    print(f"  {'total':<{width}}  {_gib(peak.total):>12}")
    if cuda:
        free, total = torch.cuda.mem_get_info(0)
        verdict = "fits" if peak.total < free else "does NOT fit"
        print(f"\nGPU 0 ({torch.cuda.get_device_name(0)}): {_gib(free)} free of {_gib(total)}: {verdict}")
    if longest_in is not None:
        longest = longest_sequence(cfg, source, mine, world_size, int(longest_in * 2**30))
        print(f"\nlongest data.max_length for {longest_in:g} GiB at batch {cfg.train.batch_size} with these settings: "
              + (f"{longest:,} tokens" if longest else "none (not even 1,024 tokens)"))
    print()


if __name__ == "__main__":
    main()
