"""What a compiled decoder block keeps for its backward pass, and what it recomputes.

transformers' own gradient checkpointing wraps a block from outside torch.compile, so backward
reruns the whole compiled forward, the block's last matmul (whose output backward does not need)
included; and a compiled block without checkpointing keeps whatever the partitioner picks.

With speed.compile the checkpoint goes inside the compiled region instead (torch.utils.checkpoint,
traced by dynamo), so the partitioner recomputes only what backward needs:
- a checkpointed block keeps its input and recomputes the rest, but not the last matmul;
- a block without checkpointing (speed.blocks_without_checkpointing) keeps the outputs of its frozen
  matmuls and of attention (selective activation checkpointing) and recomputes only the cheap work:
  norms, rotary, LoRA's rank-r up-projections, activations and dropout (from its seed). No frozen
  matmul is recomputed either way for 4-bit and unquantized bases (bitsandbytes' int8 matmul is not
  in the kept list and is recomputed). What each kind keeps per block is measured by
  scripts/block_memory.py; the figures are in docs/decisions.md.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# Compute-bound ops whose outputs a block without checkpointing keeps (cf. torchtitan's op-level
# selective activation checkpointing list). Looked up by name: not every torch build has each one.
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
)
_MATMUL_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def _kept_ops() -> set:
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    from torch._higher_order_ops.flex_attention import flex_attention

    import finetune.speed.fused_lora  # noqa: F401  (registers torch.ops.finetune)

    ops = {getattr(torch.ops.aten, name).default for name in _ATTENTION_OPS if hasattr(torch.ops.aten, name)}
    # speed.fused_lora's down-projection: its output is rank-r wide, recomputing it would read x again;
    # and its whole layer (frozen matmul and adapter), a matmul output like the others
    ops.update({torch.ops.finetune.lora_down.default, torch.ops.finetune.lora_linear.default})
    # bitsandbytes 0.50's fused 4-bit matmul; before it, a 4-bit matmul is dequantize + mm (kept as mm).
    if hasattr(torch.ops.bitsandbytes, "gemm_4bit"):
        ops.add(torch.ops.bitsandbytes.gemm_4bit.default)
    return ops | {flex_attention}


def keep_matmul_outputs(lora_ranks: frozenset[int]) -> Callable:
    """Selective checkpointing policy: keep the outputs of 4-bit and plain frozen matmuls and of attention.

    A LoRA up-projection (an mm whose inner dimension is a LoRA rank) is recomputed instead: its
    output is as large as the frozen matmul's it is added to, and costs only rank-r work to redo.
    """
    kept = _kept_ops()

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op in kept:
            return CheckpointPolicy.MUST_SAVE
        if op in _MATMUL_OPS:
            inner = args[0].shape[-1] if op is torch.ops.aten.mm.default else args[1].shape[-1]
            if inner not in lora_ranks:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def recompute_everything(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Full checkpointing, as a selective policy.

    Written out rather than left to plain checkpointing because under plain checkpointing some torch
    versions give no recompute tag to the ops of a custom autograd.Function such as bitsandbytes'
    4-bit matmul, and the partitioner then saves their outputs, doubling a block's memory
    (pytorch/pytorch#177396; docs/decisions.md). The selective path tags every op it sees.
    """
    return CheckpointPolicy.PREFER_RECOMPUTE


_RECOMPUTE_EVERYTHING = functools.partial(create_selective_checkpoint_contexts, recompute_everything)


def checkpoint_inside(blocks: list[torch.nn.Module], keep: Callable | None) -> None:
    """Make each block's forward checkpoint itself, so that compiling the block traces the checkpoint.

    `keep` is the selective checkpointing policy of blocks that keep some outputs
    (keep_matmul_outputs), or None to recompute everything but the block's input. transformers' own
    checkpointing of the blocks is turned off.
    """
    keep_context = functools.partial(create_selective_checkpoint_contexts, keep) if keep else None
    for block in blocks:
        block.gradient_checkpointing = False
        # dynamo guards on this flag (a branch of the forward), not on the context function: the
        # flag gives the two kinds of block their own compiled graphs.
        block.finetune_keeps_outputs = keep is not None
        block.finetune_keep_context = keep_context
        # The instance's forward, not the class's: accelerate's device hooks replace it per instance.
        block.finetune_unwrapped_forward = block.forward
        block.forward = types.MethodType(_checkpointed_forward, block)


def _checkpointed_forward(block, *args, **kwargs):
    forward = block.finetune_unwrapped_forward
    # Evaluation and generation (eval mode or no grad) have no backward pass to recompute for.
    if not (block.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    context_fn = block.finetune_keep_context if block.finetune_keeps_outputs else _RECOMPUTE_EVERYTHING
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


@contextlib.contextmanager
def saved_tensors_by_block(blocks: list[torch.nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """While open, collect per block the tensors its forward saves for backward: a measure of what
    each kind of block keeps (scripts/block_memory.py, tests). Parameters and packed 4-bit weights,
    which are stored anyway, are left out when the context closes."""
    saved: list[list[torch.Tensor]] = [[] for _ in blocks]
    handles = []
    for block, into in zip(blocks, saved):
        def record(tensor: torch.Tensor, into=into) -> torch.Tensor:
            into.append(tensor)
            return tensor

        hooks = torch.autograd.graph.saved_tensors_hooks(record, lambda t: t)
        # Disabled for the compiler: a compiled block's own hooks would be compiled with it.
        handles.append(block.register_forward_pre_hook(torch.compiler.disable(lambda *_, h=hooks: h.__enter__())))
        handles.append(block.register_forward_hook(
            torch.compiler.disable(lambda *_, h=hooks: h.__exit__(None, None, None))))
    try:
        yield saved
    finally:
        for handle in handles:
            handle.remove()
        for into in saved:
            into[:] = [t for t in into if not isinstance(t, torch.nn.Parameter) and t.dtype != torch.uint8]


def distinct(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` with each storage once (a tensor saved by several ops is one allocation)."""
    return list({t.data_ptr(): t for t in tensors}.values())


def distinct_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of `tensors`, each storage counted once."""
    return sum(t.numel() * t.element_size() for t in distinct(tensors))
