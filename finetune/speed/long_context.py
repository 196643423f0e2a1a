"""Memory that grows with the sequence: the MLP's intermediates and the checkpointed block inputs.

At long context two terms dominate a checkpointed step (finetune/footprint.py counts them):

    the MLP of the block being recomputed   seq x intermediate x 2 B, several times over (gate, up,
                                            their product and the gradients: 4-5 of them)
    the checkpointed block inputs           layers x seq x hidden x 2 B, held from forward to backward

`chunk_mlps` (speed.mlp_chunk_size) runs each decoder block's MLP on slices of the sequence, each
slice checkpointed, so the MLP's intermediates exist for one slice at a time; the MLP is per token,
so the result is the same (LoRA dropout draws its masks per slice: the same distribution, another draw).
speed.offload_checkpoints keeps each checkpointed block's input in pinned CPU memory instead of on
the GPU between its forward and its backward:
- uncompiled blocks (`offload_checkpoints`): the block runs under a checkpoint of our own that saves
  its input to host memory and reruns the block in backward;
- compiled blocks (`offload_saved_inputs`): the block checkpoints itself inside the compiled region
  (finetune/speed/recompute.py) and saves its input for backward like any autograd function; saved-
  tensor hooks move that input to host memory on a side stream while the next blocks compute, and
  bring it back one block ahead of the backward pass.
"""

from __future__ import annotations

import inspect
import types
import weakref
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def single_input_mlp(block: torch.nn.Module):
    """The block's MLP if its forward takes the hidden states alone (llama, mistral, qwen2, ...), else None."""
    mlp = getattr(block, "mlp", None)
    if not isinstance(mlp, torch.nn.Module):
        return None
    params = [p for p in inspect.signature(mlp.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return mlp if len(params) == 1 else None


def chunk_mlps(blocks: list[torch.nn.Module], chunk: int) -> int:
    """Run every block's MLP `chunk` tokens at a time, each chunk checkpointed; returns how many MLPs."""
    count = 0
    for block in blocks:
        mlp = single_input_mlp(block)
        if mlp is None:
            raise ValueError(f"speed.mlp_chunk_size: the MLP of {type(block).__name__} does not take the hidden "
                             "states alone; set speed.mlp_chunk_size=0")
        mlp.finetune_unchunked_forward = mlp.forward
        mlp.finetune_chunk = chunk
        mlp.forward = types.MethodType(_chunked_mlp_forward, mlp)
        count += 1
    return count


def _chunked_mlp_forward(mlp, hidden: torch.Tensor) -> torch.Tensor:
    forward = mlp.finetune_unchunked_forward
    if hidden.shape[-2] <= mlp.finetune_chunk:
        return forward(hidden)
    # Sliced with or without grad, so a rerun of the block (offload_checkpoints) draws the same
    # dropout masks as its forward did.
    pieces = hidden.split(mlp.finetune_chunk, dim=-2)
    if not torch.is_grad_enabled():
        return torch.cat([forward(piece) for piece in pieces], dim=-2)
    return torch.cat([checkpoint(forward, piece, use_reentrant=False) for piece in pieces], dim=-2)


class _OffloadedCheckpoint(torch.autograd.Function):
    """A block run without saving anything on the GPU: its input goes to pinned CPU memory, and the
    backward brings it back, reruns the block with the forward's RNG and autocast state, and
    backpropagates through the rerun (reentrant checkpointing, with the one saved tensor offloaded)."""

    @staticmethod
    def forward(ctx, run: Callable, hidden: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        ctx.device = hidden.device
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type),
                        torch.get_autocast_dtype(hidden.device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.gpu_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        pinned = hidden.is_cuda and torch.cuda.is_available()
        ctx.saved = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=pinned)
        # Same stream as the block's kernels: the copy finishes before the memory can be reused.
        ctx.saved.copy_(hidden.detach(), non_blocking=pinned)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        hidden = ctx.saved.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.saved = None
        devices = [ctx.device] if ctx.gpu_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.gpu_rng is not None:
                torch.cuda.set_rng_state(ctx.gpu_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return None, hidden.grad


def offloaded_checkpoint(run: Callable, hidden: torch.Tensor, *rest):
    """Drop-in for transformers' `_gradient_checkpointing_func(run, hidden_states)`."""
    if rest:
        raise ValueError("speed.offload_checkpoints: this decoder block passes more than the hidden states "
                         "positionally; set speed.offload_checkpoints=false")
    if not hidden.requires_grad:
        # The first block's input (frozen embeddings) needs no gradient, but the block's adapters do:
        # the backward runs only for outputs that require grad.
        hidden = hidden.detach().requires_grad_(True)
    return _OffloadedCheckpoint.apply(run, hidden)


def offload_checkpoints(blocks: list[torch.nn.Module]) -> int:
    """Give each checkpointed block the offloading checkpoint; returns how many blocks."""
    count = 0
    for block in blocks:
        if getattr(block, "gradient_checkpointing", False):
            block._gradient_checkpointing_func = offloaded_checkpoint
            count += 1
    return count


class _HostCopy:
    """One saved tensor in host memory, and its way back to the device."""

    def __init__(self, tensor: torch.Tensor, stream, previous: _HostCopy | None):
        self.device, self.stream, self.on_device, self.ready = tensor.device, stream, None, None
        # The copy saved just before this one (the block before, in forward order), to prefetch in backward;
        # weak, so that a step's copies still go with its graph.
        self.previous = weakref.ref(previous) if previous is not None else lambda: None
        if stream is None:  # a CPU model: a copy all the same, so that the path is the one a GPU takes
            self.host = tensor.detach().clone()
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(stream):
            self.host.copy_(tensor.detach(), non_blocking=True)
        # The block's memory is not reused before the copy has read it.
        tensor.record_stream(stream)

    def fetch(self) -> None:
        """Start the copy back to the device on the side stream (a prefetch, or the fetch itself)."""
        if self.on_device is not None or self.stream is None:
            return
        compute = torch.cuda.current_stream(self.device)
        self.on_device = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        self.stream.wait_stream(compute)  # the new tensor's memory may be in use by queued kernels
        with torch.cuda.stream(self.stream):
            self.on_device.copy_(self.host, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(self.stream)
        self.on_device.record_stream(self.stream)

    def take(self) -> torch.Tensor:
        if self.stream is None:
            return self.host
        self.fetch()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        return self.on_device


class SavedInputOffload:
    """Saved-tensor hooks for the compiled checkpointed blocks: the block's input, the one large tensor
    such a block saves, goes to pinned host memory. Recognised by its storage: what else the block
    saves (an attention mask shared by every block, rotary tables) stays where it is.

    The copies run on a side stream, so the forward pass does not wait for them. Backward unpacks the
    blocks in reverse order; unpacking one block's input starts copying back the block before it, so
    the next block's input is on the GPU when its backward starts.
    """

    def __init__(self):
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.last: weakref.ref = lambda: None  # the latest copy, which the next one links back to
        self.block_input = 0  # storage address of the running block's input
        self.bytes_moved = 0  # host memory written so far: what the GPU did not hold

    def pack(self, tensor: torch.Tensor):
        # Contiguous only: the copy back must have the strides the compiled backward expects.
        if tensor.untyped_storage().data_ptr() != self.block_input or not tensor.is_contiguous():
            return tensor
        if tensor.is_cuda and tensor.device not in self.streams:
            self.streams[tensor.device] = torch.cuda.Stream(tensor.device)
        copy = _HostCopy(tensor, self.streams.get(tensor.device), self.last())
        self.bytes_moved += tensor.numel() * tensor.element_size()
        self.last = weakref.ref(copy)
        return copy

    def unpack(self, packed):
        if not isinstance(packed, _HostCopy):
            return packed
        tensor = packed.take()
        previous = packed.previous()
        if previous is not None:
            previous.fetch()  # a no-op when it is already on its way
        return tensor


def offload_saved_inputs(blocks: list[torch.nn.Module]) -> SavedInputOffload:
    """Offload what each checkpointed block saves for backward (compiled blocks); the blocks' offload.

    Call before compile_blocks, which takes the blocks' checkpointing over. The hooks are entered and
    left around each block's call, outside the compiled region (compiler-disabled module hooks).
    """
    offload = SavedInputOffload()
    for block in blocks:
        if not getattr(block, "gradient_checkpointing", False):
            continue
        hooks = torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack)

        def enter(module, args, kwargs, hooks=hooks):
            if module.training and torch.is_grad_enabled():
                hidden = args[0] if args else kwargs["hidden_states"]
                offload.block_input = hidden.untyped_storage().data_ptr()
                hooks.__enter__()
                module.finetune_offloading = True

        def leave(module, args, kwargs, output, hooks=hooks):
            if getattr(module, "finetune_offloading", False):
                module.finetune_offloading = False
                hooks.__exit__(None, None, None)

        block.register_forward_pre_hook(torch.compiler.disable(enter), with_kwargs=True)
        block.register_forward_hook(torch.compiler.disable(leave), with_kwargs=True, always_call=True)
        block.finetune_offload = offload
    return offload
