"""LoRA layers whose low-rank path runs in fused kernels (speed.fused_lora).

PEFT computes a LoRA layer as `result = base(x); result = result + lora_B(lora_A(dropout(x))) * s`.
For a llama3-8b block on an H200 that is a quarter of the step (docs/decisions.md), almost none of it
the rank-r arithmetic: each of the seven adapted projections writes a dropped copy of its full-width
input, reads it for the down-projection, writes the full-width up-projection and adds it in another
pass; backward regenerates the mask, writes the full-width input gradient and masks it in a pass of
its own. Here:

- the down-projection is one Triton kernel (finetune/speed/lora_kernels.py) that applies the dropout
  mask to x while its tile is loaded: the dropped copy never exists, and backward's two kernels
  (gradient of A, gradient of x) recompute the mask the same way from the call's seed;
- with one adapter over a frozen 4-bit or plain layer, the whole layer is one op (lora_linear): the
  up-projection's [M, N] term is written first and the frozen matmul adds itself to it in place
  (beta = 1), and backward writes the adapter's share of x's gradient and lets the frozen matmul add
  its own, so neither full-width result is copied or added in a pass of its own; a 4-bit weight is
  dequantized by one Triton kernel (finetune/speed/dequant_kernels.py) on a GPU;
- otherwise (several adapters, a trained bias, hooks around the frozen layer) the frozen layer runs
  its own forward and the up-projection is added by one `addmm` per adapter.

The dropout keeps each element with probability 1 - p and scales by 1 / (1 - p), as nn.Dropout does,
from a fresh seed per call, p rounded to a multiple of 2**-16 (mask_probability); the mask is a hash
of (seed, row, column), so its draws differ from torch's random stream (as a compiled nn.Dropout's
already do). Without dropout the layer computes what
PEFT's does. Both are tested on the CPU, where Triton's interpreter runs the same kernels
(TRITON_INTERPRET=1, tests/test_fused_lora.py).
"""

from __future__ import annotations

import os
import types

import torch

from finetune.speed import fp8
from finetune.speed.dequant_kernels import frozen_weight

# The ops are registered here without importing Triton (finetune.speed.recompute names them); the
# kernels load on first use.


# Tile sizes, warps and pipeline stages per kernel; scripts/fused_lora_check.py --sweep times the
# alternatives on a GPU (docs/decisions.md has the H200's times: each within 6% of the sweep's best).
LAUNCH = {
    "down": dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=1),
    "grad_input": dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=1),
    "grad_weight": dict(BLOCK_M=128, BLOCK_K=128, num_warps=8, num_stages=1),
    "up_grads": dict(BLOCK_M=512, BLOCK_N=64, num_warps=8, num_stages=3),
}
WAVES = 4  # programs per streaming multiprocessor that the split reductions aim for
UP_GRAD_WAVES = 1  # the same for lora_up_grads, whose programs stream a long run of grad_out each
# lora_up_grads keeps one fp32 partial of B's gradient per block of rows, and the last program of each
# column split adds its span's partials alone: both grow with the input, so past this many blocks (long
# inputs) two matmuls do it
UP_GRAD_MAX_ROW_BLOCKS = 32


def _processors(x: torch.Tensor) -> int:
    """x's GPU's streaming multiprocessors; 4 off the GPU (Triton's interpreter, in tests)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4


def _splits(length: int, block: int, other_blocks: int, x: torch.Tensor) -> tuple[int, int]:
    """(splits, length per split, a multiple of block) that cut `length` so that splits x other_blocks
    programs fill the GPU's streaming multiprocessors WAVES times over: a reduction too long for a
    full grid is done in parts (fp32 partial sums, added in the kernel in a fixed order, so no atomics on
    the values and the same inputs give the same result bit for bit)."""
    splits = max(1, min(-(-WAVES * _processors(x) // other_blocks), -(-length // block)))
    per_split = -(-length // splits // block) * block
    return -(-length // per_split), per_split


def _up_grad_splits(m: int, n: int, x: torch.Tensor) -> tuple[int, int, int]:
    """(row blocks, column splits, columns per split) for lora_up_grads: one program per block of rows
    and split of the columns, about UP_GRAD_WAVES per multiprocessor."""
    launch = LAUNCH["up_grads"]
    row_blocks, col_blocks = -(-m // launch["BLOCK_M"]), -(-n // launch["BLOCK_N"])
    col_splits = min(col_blocks, -(-UP_GRAD_WAVES * _processors(x) // row_blocks))
    cols_per_split = -(-col_blocks // col_splits) * launch["BLOCK_N"]
    return row_blocks, -(-n // cols_per_split), cols_per_split


# The split reductions' arrival counts (an int32 per tile), one buffer per device that every kernel
# call shares: each kernel leaves its counts at 0 (lora_kernels.last_to_arrive), so no fill kernel runs per
# call (679 of them per llama3-8b step, each a microsecond plus a launch). Made when the layers are
# fused, before anything is compiled or recorded: made in a compiled block's first run under CUDA graphs,
# it would sit in the graphs' memory pool, which must hold nothing but their outputs (cudagraph trees
# refuse to record). 65,536 counts (256 KiB) cover 2M tokens per micro-batch at the down-projection's
# 32-row blocks; a call that needs more, or on a device without the buffer, gets counts of its own.
# The kernels must run one at a time per device (one stream, as the training step runs them): two
# launched on different streams at once would add to the same counts.
_ARRIVAL_COUNTS: dict[torch.device, torch.Tensor] = {}
ARRIVAL_COUNTS = 65536


def keep_arrival_counts(device: torch.device) -> None:
    """Make `device`'s shared buffer of arrival counts, once."""
    if device not in _ARRIVAL_COUNTS:
        _ARRIVAL_COUNTS[device] = torch.zeros(ARRIVAL_COUNTS, device=device, dtype=torch.int32)


def _arrival_counts(n: int, like: torch.Tensor) -> torch.Tensor:
    """n zeroed int32 arrival counts on like's device: the shared buffer's first n where it is large enough."""
    counts = _ARRIVAL_COUNTS.get(like.device)
    return counts[:n] if counts is not None and counts.numel() >= n else \
        torch.zeros(n, device=like.device, dtype=torch.int32)


MASK_STEPS = 2**16  # each keep bit compares 16 bits of the hash with p's share of them


def mask_probability(p: float) -> float:
    """The probability with which the kernels drop an element for dropout p: p rounded to a multiple of
    2**-16 (at most 1 - 2**-16, so an element is always kept with some chance)."""
    return min(round(p * MASK_STEPS), MASK_STEPS - 1) / MASK_STEPS


def _shared_arguments(p: float, r: int, x: torch.Tensor, scaling: float) -> dict:
    """The dropout, scale, rank and precision arguments every kernel takes. fp32 inputs get exact fp32
    dot products (not TF32); off the GPU (Triton's interpreter) dot products run in fp32 and bf16 results are
    rounded as a GPU rounds them."""
    dropped = mask_probability(p)
    return dict(threshold=round(dropped * MASK_STEPS), scale=scaling / (1.0 - dropped), R=r, R_PAD=max(16, 1 << (r - 1).bit_length()),
                DROPOUT=dropped > 0, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", INTERPRETER=not x.is_cuda)


@torch.library.custom_op("finetune::lora_down", mutates_args=())
def lora_down(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float, scaling: float = 1.0) -> torch.Tensor:
    """scaling * dropout(x, p) @ weight.T in x's dtype for x [M, K] and weight [R, K] (of any float
    dtype), the dropout mask drawn from `seed`, summed in fp32 over splits of the columns."""
    from finetune.speed import lora_kernels as k

    m, width = x.shape
    r = weight.shape[0]
    launch = LAUNCH["down"]
    row_blocks = -(-m // launch["BLOCK_M"])
    splits, cols_per_split = _splits(width, launch["BLOCK_K"], row_blocks, x)
    u = x.new_empty(m, r)
    partial = torch.empty(splits, m, r, device=x.device, dtype=torch.float32)
    counters = _arrival_counts(row_blocks, x)
    k.lora_down_kernel[(row_blocks, splits)](x, weight, u, partial, counters, seed, m, width, splits, cols_per_split,
                                             **launch, **_shared_arguments(p, r, x, scaling))
    return u


@lora_down.register_fake
def _(x, weight, seed, p, scaling=1.0):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("finetune::lora_down_grad_input", mutates_args=())
def lora_down_grad_input(grad_u: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float,
                         scaling: float = 1.0, addend: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of lora_down with respect to x: scaling * (grad_u @ weight) through the same mask, in
    grad_u's dtype, plus `addend` ([M, K]) where given: added in fp32 before the one rounding, so an
    addend costs one read, where adding it afterwards reads and writes the result twice more."""
    from finetune.speed import lora_kernels as k

    m, r = grad_u.shape
    width = weight.shape[1]
    if addend is not None and tuple(addend.shape) != (m, width):
        raise ValueError(f"lora_down_grad_input: an addend of shape {list(addend.shape)} for a gradient of "
                         f"shape {[m, width]}")
    grad_x = grad_u.new_empty(m, width)
    launch = LAUNCH["grad_input"]
    k.lora_down_grad_input_kernel[(-(-m // launch["BLOCK_M"]), -(-width // launch["BLOCK_K"]))](
        grad_u, weight, grad_x if addend is None else addend.contiguous(), grad_x, seed, m, width, **launch,
        ADD=addend is not None, **_shared_arguments(p, r, grad_u, scaling))
    return grad_x


@lora_down_grad_input.register_fake
def _(grad_u, weight, seed, p, scaling=1.0, addend=None):
    return grad_u.new_empty(grad_u.shape[0], weight.shape[1])


@torch.library.custom_op("finetune::lora_down_grad_weight", mutates_args=())
def lora_down_grad_weight(grad_u: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, p: float,
                          scaling: float = 1.0) -> torch.Tensor:
    """The gradient of lora_down with respect to weight: scaling * grad_u.T @ dropout(x), in fp32, summed
    over splits of the rows."""
    from finetune.speed import lora_kernels as k

    m, r = grad_u.shape
    width = x.shape[1]
    launch = LAUNCH["grad_weight"]
    column_blocks = -(-width // launch["BLOCK_K"])
    splits, rows_per_split = _splits(m, launch["BLOCK_M"], column_blocks, x)
    grad_a = torch.empty(r, width, device=x.device, dtype=torch.float32)
    partial = torch.empty(splits, r, width, device=x.device, dtype=torch.float32)
    counters = _arrival_counts(column_blocks, x)
    k.lora_down_grad_weight_kernel[(column_blocks, splits)](
        grad_u, x, grad_a, partial, counters, seed, m, width, splits, rows_per_split, **launch,
        **_shared_arguments(p, r, x, scaling))
    return grad_a


@lora_down_grad_weight.register_fake
def _(grad_u, x, seed, p, scaling=1.0):
    return x.new_empty(grad_u.shape[1], x.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, seed, p, scaling = inputs
    ctx.save_for_backward(x, weight, seed)
    ctx.p, ctx.scaling = p, scaling


def _backward(ctx, grad_u):
    x, weight, seed = ctx.saved_tensors
    grad_u = grad_u.contiguous()
    grad_x = lora_down_grad_input(grad_u, weight, seed, ctx.p, ctx.scaling) if ctx.needs_input_grad[0] else None
    grad_w = (lora_down_grad_weight(grad_u, x, seed, ctx.p, ctx.scaling).to(weight.dtype)
              if ctx.needs_input_grad[1] else None)
    return grad_x, grad_w, None, None, None


lora_down.register_autograd(_backward, setup_context=_setup_context)


# (device, dtype) pairs whose shared memory lora_up_grads' tiles exceed (fp32 inputs, or a GPU with
# less than an H100's): there it leaves the work to two matmuls, found out once per pair
_UP_GRADS_DO_NOT_FIT: set[tuple[torch.device, torch.dtype]] = set()


def lora_up_grads(grad_out: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_out @ B in grad_out's dtype, grad_out.T @ u in B's dtype) for grad_out [M, N], u [M, R] and
    B [N, R] of any float dtype (rounded to grad_out's as it is loaded), both summed in fp32, from one
    read of grad_out: two matmuls read it twice, and at inner dimension R each is bound by that read.
    Two matmuls still do it for long inputs (past UP_GRAD_MAX_ROW_BLOCKS blocks of rows), empty ones,
    and where the kernel's tiles do not fit the GPU's shared memory."""
    from triton.runtime.errors import OutOfResources

    from finetune.speed import lora_kernels as k

    m, n = grad_out.shape
    if m == 0 or n == 0 or (grad_out.device, grad_out.dtype) in _UP_GRADS_DO_NOT_FIT:
        return _two_matmuls(grad_out, u, lora_b)
    row_blocks, col_splits, cols_per_split = _up_grad_splits(m, n, grad_out)
    if row_blocks > UP_GRAD_MAX_ROW_BLOCKS:
        return _two_matmuls(grad_out, u, lora_b)
    r = u.shape[1]
    grad_u, grad_b = grad_out.new_empty(m, r), torch.empty_like(lora_b)
    part_u = torch.empty(col_splits, m, r, device=u.device, dtype=torch.float32)
    part_b = torch.empty(row_blocks, n, r, device=u.device, dtype=torch.float32)
    counters = _arrival_counts(row_blocks + col_splits, u)
    shared = _shared_arguments(0.0, r, grad_out, 1.0)
    try:
        k.lora_up_grads_kernel[(row_blocks, col_splits)](
            grad_out, u, lora_b, grad_u, grad_b, part_u, part_b, counters, m, n, col_splits, cols_per_split, R=r,
            R_PAD=shared["R_PAD"], PRECISION=shared["PRECISION"], INTERPRETER=shared["INTERPRETER"],
            **LAUNCH["up_grads"])
    except OutOfResources:  # raised when the kernel is compiled for this GPU, before it runs
        _UP_GRADS_DO_NOT_FIT.add((grad_out.device, grad_out.dtype))
        return _two_matmuls(grad_out, u, lora_b)
    return grad_u, grad_b


def _two_matmuls(grad_out: torch.Tensor, u: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_up_grads' results from two matmuls, B's gradient summed in fp32 (on a GPU one GEMM with an
    fp32 output)."""
    grad_u = torch.mm(grad_out, lora_b.to(grad_out.dtype))
    if grad_out.is_cuda and grad_out.dtype in (torch.bfloat16, torch.float16):
        return grad_u, torch.mm(grad_out.t(), u, out_dtype=torch.float32).to(lora_b.dtype)
    return grad_u, torch.mm(grad_out.t().float(), u.float()).to(lora_b.dtype)


@torch.library.custom_op("finetune::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor | None, code: torch.Tensor | None,
                nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
                fp8_scale: torch.Tensor | None, quant_type: str, blocksize: int, nested_blocksize: int,
                shape: list[int], bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor,
                seed: torch.Tensor, p: float, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ W.T + bias + scaling * dropout(x, p) @ A.T @ B.T for x [M, K] and the frozen W [N, K] (see
    frozen_weight), in x's dtype; returns it and u = scaling * dropout(x) @ A.T, which backward needs.
    A and B come in their own dtype (an fp32 adapter under autocast) and their gradients go back in it.

    The low-rank term is written first and the frozen matmul adds itself to it in place (a GEMM with
    beta = 1 reads it in its epilogue): the [M, N] output is written once, where adding the
    adapter's term after the frozen matmul reads and writes it twice more (and `addmm` copies it once
    before that). The scaling rides in the down-projection kernel's own scale, and A is rounded to
    x's dtype as the kernel loads it: each would otherwise be a kernel of its own per layer and step.

    With fp8_scale (a 4-bit W's FP8 scale, speed.fp8_frozen_matmuls) the frozen matmul runs in FP8
    (finetune/speed/fp8.py) and the adapter's term is added to its output."""
    with torch.autocast(x.device.type, enabled=False):
        u = lora_down(x, lora_a, seed, p, scaling)
        low_rank_b = lora_b.to(x.dtype).t()
        if fp8_scale is not None and fp8.runs_in_fp8(x.shape[0], shape, blocksize):
            out = fp8.frozen_forward(x, weight, absmax, code, nested_absmax, nested_code, offset, fp8_scale, quant_type,
                                     blocksize, nested_blocksize, shape).addmm_(u, low_rank_b)
            return (out if bias is None else out.add_(bias)), u
        out = torch.mm(u, low_rank_b) if bias is None else torch.addmm(bias, u, low_rank_b)
        w = frozen_weight(weight, absmax, code, nested_absmax, nested_code, offset, quant_type, blocksize,
                          nested_blocksize, shape, x.dtype)
        return out.addmm_(x, w.t()), u


@lora_linear.register_fake
def _(x, weight, absmax, code, nested_absmax, nested_code, offset, fp8_scale, quant_type, blocksize, nested_blocksize,
      shape, bias, lora_a, lora_b, seed, p, scaling):
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@torch.library.custom_op("finetune::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, u: torch.Tensor, weight: torch.Tensor,
                         absmax: torch.Tensor | None, code: torch.Tensor | None, nested_absmax: torch.Tensor | None,
                         nested_code: torch.Tensor | None, offset: torch.Tensor | None, fp8_scale: torch.Tensor | None,
                         quant_type: str, blocksize: int, nested_blocksize: int, shape: list[int], lora_a: torch.Tensor,
                         lora_b: torch.Tensor, seed: torch.Tensor, p: float, scaling: float,
                         input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of lora_linear with respect to x, A and B (x's is empty without `input_grad`), A's
    and B's in their own dtype, summed in fp32. The adapter's share of x's gradient is written first
    and the frozen matmul's adds itself to it in place; in FP8 the frozen matmul's share comes first
    and the adapter's kernel adds it as it writes (torch's FP8 matmul takes no addend)."""
    with torch.autocast(x.device.type, enabled=False):
        grad_u, grad_b = lora_up_grads(grad_out, u, lora_b)  # u carries the scaling
        grad_a = lora_down_grad_weight(grad_u, x, seed, p, scaling).to(lora_a.dtype)
        if not input_grad:
            return x.new_empty(0), grad_a, grad_b
        if fp8_scale is not None and fp8.runs_in_fp8(x.shape[0], shape, blocksize):
            frozen_grad = fp8.frozen_input_grad(grad_out, weight, absmax, code, nested_absmax, nested_code, offset,
                                                fp8_scale, quant_type, blocksize, nested_blocksize, shape)
            return lora_down_grad_input(grad_u, lora_a, seed, p, scaling, addend=frozen_grad), grad_a, grad_b
        grad_x = lora_down_grad_input(grad_u, lora_a, seed, p, scaling)
        w = frozen_weight(weight, absmax, code, nested_absmax, nested_code, offset, quant_type, blocksize,
                          nested_blocksize, shape, x.dtype)
        return grad_x.addmm_(grad_out, w), grad_a, grad_b


@lora_linear_backward.register_fake
def _(grad_out, x, u, weight, absmax, code, nested_absmax, nested_code, offset, fp8_scale, quant_type, blocksize,
      nested_blocksize, shape, lora_a, lora_b, seed, p, scaling, input_grad):
    return x.new_empty(x.shape if input_grad else (0,)), torch.empty_like(lora_a), torch.empty_like(lora_b)


# lora_linear's arguments after x that describe the frozen layer: tensors (weight .. fp8_scale), then settings
# (quant_type .. shape)
_FROZEN_TENSORS, _FROZEN_SETTINGS = 7, 4


def _lora_linear_setup(ctx, inputs, output):
    x, *frozen, bias, lora_a, lora_b, seed, p, scaling = inputs
    tensors, ctx.frozen_settings = frozen[:_FROZEN_TENSORS], frozen[_FROZEN_TENSORS:]
    ctx.save_for_backward(x, output[1], *tensors, lora_a, lora_b, seed)
    ctx.p, ctx.scaling = p, scaling


def _lora_linear_grad(ctx, grad_out, _grad_u):
    x, u, *frozen_tensors, lora_a, lora_b, seed = ctx.saved_tensors
    input_grad = ctx.needs_input_grad[0]
    grad_x, grad_a, grad_b = lora_linear_backward(grad_out.contiguous(), x, u, *frozen_tensors, *ctx.frozen_settings,
                                                  lora_a, lora_b, seed, ctx.p, ctx.scaling, input_grad)
    no_grads = [None] * (_FROZEN_TENSORS + _FROZEN_SETTINGS + 1)  # the frozen layer and its bias
    return grad_x if input_grad else None, *no_grads, grad_a, grad_b, None, None, None


lora_linear.register_autograd(_lora_linear_grad, setup_context=_lora_linear_setup)


def frozen_operands(base: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple | None:
    """lora_linear's arguments for the frozen layer `base` (weight .. shape, then its bias; fp8_scale where
    give_fp8_scales gave the layer one), or None when lora_linear would not compute what the layer's
    own forward does with x: it must be a bitsandbytes 4-bit layer computing in `dtype` (its weight
    packed as bitsandbytes' own matmul reads it, [out, in]) or a plain linear layer whose weight is of
    `dtype`; frozen, bias included (lora_linear gives them no gradient); on x's device; with no hooks
    around its forward (accelerate's offload hooks bring the weights there)."""
    import bitsandbytes as bnb

    weight, bias = base.weight, base.bias
    if (x.dtype != dtype or weight.device != x.device or weight.requires_grad
            or (bias is not None and (bias.dtype != dtype or bias.requires_grad))
            or hasattr(base, "_hf_hook") or base._forward_hooks or base._forward_pre_hooks):
        return None
    if type(base) is torch.nn.Linear:
        return (weight, None, None, None, None, None, None, "", 0, 0, list(weight.shape), bias) \
            if weight.dtype == dtype and type(weight.data) is torch.Tensor else None
    state = getattr(weight, "quant_state", None)
    if (type(base) is not bnb.nn.Linear4bit or base.compute_dtype != dtype or state is None
            or getattr(state, "packing_format_for_cpu", False)
            or list(state.shape) != [base.out_features, base.in_features]):
        return None
    from finetune.speed.dequant_kernels import quant_state_operands

    absmax, code, nested_absmax, nested_code, offset, *settings = quant_state_operands(state)
    fp8_scale = getattr(base, "finetune_fp8_scale", None)  # set by give_fp8_scales
    return weight, absmax, code, nested_absmax, nested_code, offset, fp8_scale, *settings, bias


def fusable(layer: torch.nn.Module) -> bool:
    """A PEFT LoRA layer over a linear base (plain, 4-bit or 8-bit) that fused_forward computes in full."""
    from peft.tuners.lora import LoraLayer

    return (isinstance(layer, LoraLayer) and isinstance(layer.get_base_layer(), torch.nn.Linear)
            and not getattr(layer, "fan_in_fan_out", False))


def _dropout_and_seed(layer, adapter: str, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The adapter's dropout probability in this mode and a fresh seed for its mask."""
    dropout = layer.lora_dropout[adapter]
    p = dropout.p if layer.training and isinstance(dropout, torch.nn.Dropout) else 0.0
    seed = (torch.randint(-2**31, 2**31 - 1, (), device=x.device, dtype=torch.int32) if p > 0
            else torch.zeros((), device=x.device, dtype=torch.int32))
    return p, seed


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoRA linear layer's forward with the low-rank path in lora_down: with one adapter over a
    4-bit or plain frozen layer of the input's dtype, the whole layer in one op (lora_linear); else the
    frozen layer's own forward and one addmm per adapter.

    Whatever this does not cover (adapters disabled or merged, mixed adapter batches, DoRA and other
    variants, a bias on lora_B) goes through PEFT's own forward.
    """
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
            or any(a in self.lora_variant or self.lora_B[a].bias is not None for a in adapters)):
        return self.finetune_peft_forward(x, *args, **kwargs)
    autocast = torch.is_autocast_enabled(x.device.type)
    flat = x.reshape(-1, x.shape[-1])
    if len(adapters) == 1 and not args and not kwargs:
        adapter = adapters[0]
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else a.dtype
        frozen = frozen_operands(self.base_layer, x, dtype)
        if frozen is not None:
            p, seed = _dropout_and_seed(self, adapter, x)
            out, _ = lora_linear(flat.contiguous(), *frozen, a, b, seed, p, self.scaling[adapter])
            return out.view(*x.shape[:-1], out.shape[-1])
    result = self.base_layer(x, *args, **kwargs)
    out = result.reshape(-1, result.shape[-1])
    for adapter in adapters:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        # PEFT's dtypes: the autocast dtype under autocast, else the adapter's own, the sum in the result's.
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else a.dtype
        p, seed = _dropout_and_seed(self, adapter, x)
        u = lora_down(flat.to(dtype).contiguous(), a.to(dtype), seed, p)
        with torch.autocast(x.device.type, enabled=False):
            if out.dtype == dtype:
                out = torch.addmm(out, u, b.to(dtype).t(), alpha=self.scaling[adapter])
            else:
                out = out + (torch.mm(u, b.to(dtype).t()) * self.scaling[adapter]).to(out.dtype)
    return out.view(result.shape)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every fusable LoRA layer fused_forward; returns how many. PEFT's forward is kept on the
    layer (finetune_peft_forward) for what fused_forward does not cover."""
    fused = 0
    for module in model.modules():
        if fusable(module) and not hasattr(module, "finetune_peft_forward"):
            module.finetune_peft_forward = module.forward
            module.forward = types.MethodType(fused_forward, module)
            fused += 1
            for adapter in module.lora_A.values():
                if adapter.weight.device.type in ("cuda", "cpu"):
                    keep_arrival_counts(adapter.weight.device)
    return fused


def give_fp8_scales(model: torch.nn.Module) -> tuple[int, int]:
    """speed.fp8_frozen_matmuls: give each fused LoRA layer's frozen bitsandbytes 4-bit base (bf16
    compute) its weight's FP8 scale (finetune/speed/fp8.py), found here once, as the weight is frozen;
    returns (how many got one, how many 4-bit bases there are). A base whose features are not multiples
    of 16, or of its quantization block, gets none and keeps bf16 matmuls."""
    import bitsandbytes as bnb

    bases = [m.get_base_layer() for m in model.modules() if hasattr(m, "finetune_peft_forward")]
    four_bit = [b for b in bases if type(b) is bnb.nn.Linear4bit]
    return sum(give_fp8_scale(b) for b in four_bit), len(four_bit)


def give_fp8_scale(base: torch.nn.Module) -> bool:
    """Give a frozen bitsandbytes 4-bit layer computing in bf16 its weight's FP8 scale, as a buffer
    that is not saved (finetune_fp8_scale), where lora_linear runs it and its shape can run in FP8;
    returns whether it got one."""
    probe = torch.empty(0, base.in_features, device=base.weight.device, dtype=torch.bfloat16)
    operands = frozen_operands(base, probe, torch.bfloat16)
    if operands is None or operands[1] is None:  # not a 4-bit layer lora_linear runs in bf16
        return False
    weight, absmax, code, nested_absmax, nested_code, offset, _, *settings, _ = operands
    if not fp8.layer_runs_in_fp8(settings[3], settings[1]):
        return False
    with torch.no_grad():
        w = frozen_weight(weight, absmax, code, nested_absmax, nested_code, offset, *settings, torch.float32)
        base.register_buffer("finetune_fp8_scale", fp8.weight_scale(w), persistent=False)
    return True


def kernel_problems(cuda_available: bool) -> list[str]:
    """Why speed.fused_lora cannot run here, if it cannot: it needs Triton and a CUDA GPU (or Triton's
    CPU interpreter, TRITON_INTERPRET=1, which runs the same kernels slowly: for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return ["speed.fused_lora=true runs Triton kernels but triton is not installed (it comes with CUDA "
                "builds of torch; `pip install triton`), or set speed.fused_lora=false"]
    if not cuda_available and os.environ.get("TRITON_INTERPRET") != "1":
        return ["speed.fused_lora=true runs Triton kernels on a CUDA GPU and none is visible; set "
                "speed.fused_lora=false (on the CPU, TRITON_INTERPRET=1 runs them slowly, for tests)"]
    return []
