"""Compiled decoder blocks, and which blocks skip recompute (speed.compile, speed.blocks_without_checkpointing).

Regional compilation: every repeated decoder block is compiled in place and shares one compiled
graph per batch width. Compiled blocks compile for static shapes (a symbolic width fails in torch's
partitioner for these checkpointed blocks, see docs/decisions.md), so batch widths are padded to a
few fixed widths (batch_widths) to bound the number of compiles.
"""

from __future__ import annotations

from typing import Optional

import torch

from finetune.config import SpeedConfig
from finetune.speed.fused_lora import fuse_lora_layers, give_fp8_scales
from finetune.speed.host_embeddings import offload_embeddings
from finetune.speed.long_context import chunk_mlps, offload_checkpoints, offload_saved_inputs
from finetune.speed.recompute import checkpoint_inside, keep_matmul_outputs

# Batch widths of compiled runs are padded to a multiple of this (the collator, scripts/bench.py).
COMPILED_WIDTH_MULTIPLE = 128


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The repeated decoder blocks: the longest ModuleList whose members share one class."""
    blocks = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
         and len({type(b) for b in m}) == 1),
        key=len, default=None,
    )
    return list(blocks or [])


def apply_speed(model, speed: SpeedConfig, max_length: int) -> None:
    """Apply the speed settings to a model ready for training (LoRA attached, checkpointing on)."""
    keep_activations_of_last_blocks(model, speed.blocks_without_checkpointing)
    if speed.offload_embeddings:
        offload_embeddings(model)
    if speed.fused_lora:
        fuse_lora_layers(model)
    if speed.fused_lora and speed.fp8_frozen_matmuls:
        given, four_bit = give_fp8_scales(model)
        if given < four_bit:
            print(f"[finetune] speed.fp8_frozen_matmuls: {four_bit - given} of {four_bit} LoRA layers over 4-bit "
                  "weights keep bf16 matmuls (features not multiples of 16 or of quant.blocksize)", flush=True)
    if speed.mlp_chunk_size:
        chunk_mlps(decoder_blocks(model), speed.mlp_chunk_size)
    if speed.offload_checkpoints:
        # Compiled blocks checkpoint themselves inside the compiled region: their saved input is moved
        # by saved-tensor hooks. Uncompiled ones run under a checkpoint that offloads its input.
        (offload_saved_inputs if speed.compile else offload_checkpoints)(decoder_blocks(model))
    if speed.compile:
        compile_blocks(model, speed.cuda_graphs, widths=len(batch_widths(speed, False, max_length)))


def keep_activations_of_last_blocks(model, count: int) -> None:
    """Turn gradient checkpointing off for the last `count` decoder blocks (speed.blocks_without_checkpointing).

    The preflight has checked that the model has that many blocks; this is the guard behind it.
    """
    if count == 0:
        return
    blocks = [b for b in decoder_blocks(model) if getattr(b, "gradient_checkpointing", False)]
    if count > len(blocks):
        raise ValueError(f"speed.blocks_without_checkpointing={count} but the model has {len(blocks)} "
                         "checkpointed decoder blocks")
    for block in blocks[len(blocks) - count:]:
        block.gradient_checkpointing = False
        block.finetune_without_checkpointing = True  # compile_blocks gives these their own policy


def checkpointing_of(block) -> str:
    """A block's gradient checkpointing before compile_blocks takes it over: "checkpointed", "without
    checkpointing" (speed.blocks_without_checkpointing) or "none" (train.gradient_checkpointing=false)."""
    if getattr(block, "gradient_checkpointing", False):
        return "checkpointed"
    return "without checkpointing" if getattr(block, "finetune_without_checkpointing", False) else "none"


def batch_widths(speed: SpeedConfig, packed: bool, max_length: int) -> Optional[list[int]]:
    """The widths batches are padded to (None: each batch's own width).

    Compiled blocks compile once per width, so a compiled run pads to speed.width_buckets widths,
    evenly spaced multiples of 128 up to max_length: a short batch pays some padding, never a new
    compile. Packed rows (nearly full anyway) and CUDA graphs (one graph, not one per width) take
    max_length alone.
    """
    if not speed.compile:
        return None
    if packed or speed.cuda_graphs:
        return [max_length]
    steps = speed.width_buckets
    rounded = {min(max_length, -(-max_length * k // steps // COMPILED_WIDTH_MULTIPLE) * COMPILED_WIDTH_MULTIPLE)
               for k in range(1, steps + 1)}
    return sorted(rounded | {max_length})


def compile_blocks(model, cuda_graphs: bool = False, widths: int = 16) -> int:
    """torch.compile each repeated decoder block in place; returns how many were compiled.

    In place (`Module.compile`), unlike accelerate's `compile_regions`, which rebuilds the modules and
    so renames the adapter weights in the state dict that PEFT saves. Checkpointing moves inside the
    compiled blocks (finetune.speed.recompute): checkpointed blocks recompute only what backward needs,
    the others keep their matmul and attention outputs only.

    Dynamo's recompile limit is raised to hold `widths` batch widths, for training and evaluation, both kinds
    of block, a short last batch, and batches with and without padding (SDPA gets no mask without
    padding); past the limit blocks would silently run eagerly.
    """
    blocks = decoder_blocks(model)
    # Without train.gradient_checkpointing no block is checkpointed: those compile as they are.
    checkpointed = [b for b in blocks if checkpointing_of(b) == "checkpointed"]
    without = [b for b in blocks if checkpointing_of(b) == "without checkpointing"]
    checkpoint_inside(checkpointed, keep=None)
    if without:
        ranks = {int(r) for c in getattr(model, "peft_config", {}).values() for r in [c.r, *c.rank_pattern.values()]}
        checkpoint_inside(without, keep=keep_matmul_outputs(frozenset(ranks)))
    graphs = 2 * 2 * 2 * 2 * widths  # (training, evaluation) x kinds of block x (full, short batch) x (mask, none)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 2 * graphs)
    # transformers >= 5.25 wraps attention's forward in `kernels`' use_kernelized_func, which sets and
    # resets a module-level variable around the call: inside the checkpoint that the blocks compile
    # around themselves, Dynamo refuses that side effect and the whole block runs uncompiled. It is
    # undone before the forward returns, so a recompute has nothing to replay.
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in blocks:
        block.compile(mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    return len(blocks)
