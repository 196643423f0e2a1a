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
                         scaling: float = 1.0) -> torch.Tensor:
    """The gradient of lora_down with respect to x: scaling * (grad_u @ weight) through the same mask, in
    grad_u's dtype."""
    from finetune.speed import lora_kernels as k

    m, r = grad_u.shape
    width = weight.shape[1]
    grad_x = grad_u.new_empty(m, width)
    launch = LAUNCH["grad_input"]
    k.lora_down_grad_input_kernel[(-(-m // launch["BLOCK_M"]), -(-width // launch["BLOCK_K"]))](
        grad_u, weight, grad_x, seed, m, width, **launch, **_shared_arguments(p, r, grad_u, scaling))
    return grad_x


@lora_down_grad_input.register_fake
def _(grad_u, weight, seed, p, scaling=1.0):
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


def frozen_weight(weights: list[torch.Tensor], absmax: list[torch.Tensor], code: list[torch.Tensor],
                  nested_absmax: list[torch.Tensor], nested_code: list[torch.Tensor], offset: list[torch.Tensor],
                  quant_type: str, blocksize: int, nested_blocksize: int, out_features: list[int],
                  dtype: torch.dtype) -> torch.Tensor:
    """The frozen layers' [out, in] weights in `dtype`, stacked along out: plain weights as they are, bitsandbytes
    4-bit ones (the quantization lists empty for plain ones) dequantized (with their nested absmax, double
    quantization) as bitsandbytes' own 4-bit matmul does: on a GPU by one Triton kernel per layer that
    gives the same bits (finetune/speed/dequant_kernels.py), written into its rows of the stacked weight;
    elsewhere by bitsandbytes itself."""
    if not absmax:
        return weights[0] if len(weights) == 1 else torch.cat(weights)
    nested = [(nested_absmax[i], nested_code[i], offset[i]) if nested_absmax else (None, None, None)
              for i in range(len(weights))]
    in_features = weights[0].numel() * 2 // out_features[0]
    if weights[0].is_cuda:
        from finetune.speed.dequant_kernels import dequantize_4bit_into

        stacked = torch.empty(sum(out_features), in_features, device=weights[0].device, dtype=dtype)
        for rows, packed, scales, table, (nested_scales, nested_table, shift) in zip(
                stacked.split(out_features), weights, absmax, code, nested):
            dequantize_4bit_into(rows, packed, scales, table, blocksize, nested_scales, nested_table, shift,
                                 nested_blocksize)
        return stacked
    parts = []
    for packed, scales, rows, (nested_scales, nested_table, shift) in zip(weights, absmax, out_features, nested):
        if nested_scales is not None:
            scales = torch.ops.bitsandbytes.dequantize_blockwise.default(scales, nested_scales, nested_table,
                                                                         nested_blocksize, torch.float32) + shift
        parts.append(torch.ops.bitsandbytes.dequantize_4bit.default(packed, scales, blocksize, quant_type,
                                                                    [rows, in_features], dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _block_diagonal(lora_b: list[torch.Tensor]) -> torch.Tensor:
    """The layers' up-projections as one [sum of out, sum of ranks] matrix: B_i in block (i, i), zeros
    elsewhere, so that u (every layer's rank-r columns side by side) @ its transpose gives each
    layer's term in its own columns. The zeros cost rank-r work, not a pass over anything full-width."""
    return lora_b[0] if len(lora_b) == 1 else torch.block_diag(*lora_b)


@torch.library.custom_op("finetune::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weights: list[torch.Tensor], absmax: list[torch.Tensor], code: list[torch.Tensor],
                nested_absmax: list[torch.Tensor], nested_code: list[torch.Tensor], offset: list[torch.Tensor],
                quant_type: str, blocksize: int, nested_blocksize: int, out_features: list[int],
                bias: list[torch.Tensor], lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], seed: torch.Tensor,
                p: float, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For LoRA layers over frozen layers that all read x [M, K] (one layer, or siblings such as q, k and
    v), every layer's x @ W_i.T + bias_i + scaling * dropout(x, p) @ A_i.T @ B_i.T, side by side in
    one [M, sum of out] result of x's dtype (see frozen_weight for W; the frozen operands come in lists,
    one entry per layer, from stacked_operands); returns it and u = scaling * dropout(x) @ [A_1; A_2; ..].T,
    which backward needs. One dropout mask for all the layers. The adapters come in their own dtype (fp32
    under autocast) and their gradients go back in it.

    The low-rank term is written first and the frozen matmul adds itself to it in place (a GEMM with
    beta = 1 reads it in its epilogue): the [M, N] output is written once, where adding the
    adapter's term after the frozen matmul reads and writes it twice more (and `addmm` copies it once
    before that). The scaling rides in the down-projection kernel's own scale, and A is rounded to
    x's dtype as the kernel loads it: each would otherwise be a kernel of its own per layer and step.
    Siblings share the passes over x: one down-projection kernel for all their adapters, one frozen
    matmul of the stacked weight."""
    with torch.autocast(x.device.type, enabled=False):
        u = lora_down(x, _stacked(lora_a), seed, p, scaling)
        low_rank_b = _block_diagonal(lora_b).to(x.dtype).t()
        out = torch.mm(u, low_rank_b) if not bias else torch.addmm(_stacked(bias), u, low_rank_b)
        w = frozen_weight(weights, absmax, code, nested_absmax, nested_code, offset, quant_type, blocksize,
                          nested_blocksize, out_features, x.dtype)
        return out.addmm_(x, w.t()), u


@lora_linear.register_fake
def _(x, weights, absmax, code, nested_absmax, nested_code, offset, quant_type, blocksize, nested_blocksize,
      out_features, bias, lora_a, lora_b, seed, p, scaling):
    return x.new_empty(x.shape[0], sum(out_features)), x.new_empty(x.shape[0], sum(a.shape[0] for a in lora_a))


@torch.library.custom_op("finetune::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, u: torch.Tensor, weights: list[torch.Tensor],
                         absmax: list[torch.Tensor], code: list[torch.Tensor], nested_absmax: list[torch.Tensor],
                         nested_code: list[torch.Tensor], offset: list[torch.Tensor], quant_type: str, blocksize: int,
                         nested_blocksize: int, out_features: list[int], lora_a: list[torch.Tensor],
                         lora_b: list[torch.Tensor], seed: torch.Tensor, p: float, scaling: float,
                         input_grad: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The gradients of lora_linear with respect to x, each A and each B (x's is empty without
    `input_grad`), A's and B's in their own dtype, summed in fp32. The adapters' share of x's gradient
    is written first and the frozen matmul's adds itself to it in place: siblings' gradients of x add
    up inside these kernels, not in passes of their own."""
    with torch.autocast(x.device.type, enabled=False):
        grad_u, grad_b = lora_up_grads(grad_out, u, _block_diagonal(lora_b))  # u carries the scaling
        grad_a = lora_down_grad_weight(grad_u, x, seed, p, scaling).to(lora_a[0].dtype)
        if len(lora_a) == 1:
            grad_as, grad_bs = [grad_a], [grad_b]
        else:  # each layer's own blocks, copied: an op's outputs must not share memory
            ranks = [a.shape[0] for a in lora_a]
            grad_as = [part.clone() for part in grad_a.split(ranks)]
            grad_bs = [rows.split(ranks, 1)[i].contiguous() for i, rows in enumerate(grad_b.split(out_features))]
        if not input_grad:
            return x.new_empty(0), grad_as, grad_bs
        grad_x = lora_down_grad_input(grad_u, _stacked(lora_a), seed, p, scaling)
        w = frozen_weight(weights, absmax, code, nested_absmax, nested_code, offset, quant_type, blocksize,
                          nested_blocksize, out_features, x.dtype)
        return grad_x.addmm_(grad_out, w), grad_as, grad_bs


@lora_linear_backward.register_fake
def _(grad_out, x, u, weights, absmax, code, nested_absmax, nested_code, offset, quant_type, blocksize,
      nested_blocksize, out_features, lora_a, lora_b, seed, p, scaling, input_grad):
    return (x.new_empty(x.shape if input_grad else (0,)), [torch.empty_like(a) for a in lora_a],
            [torch.empty_like(b) for b in lora_b])


# lora_linear's arguments after x that describe the frozen layers: lists of tensors (weights .. offset), then
# settings (quant_type .. out_features), then the biases
_FROZEN_LISTS, _FROZEN_SETTINGS = 6, 4


def _lora_linear_setup(ctx, inputs, output):
    x, *frozen, bias, lora_a, lora_b, seed, p, scaling = inputs
    lists, ctx.frozen_settings = frozen[:_FROZEN_LISTS], frozen[_FROZEN_LISTS:]
    ctx.list_lengths = [len(t) for t in (*lists, lora_a, lora_b)]
    ctx.bias_count = len(bias)
    ctx.save_for_backward(x, output[1], seed, *(t for tensors in (*lists, lora_a, lora_b) for t in tensors))
    ctx.p, ctx.scaling = p, scaling


def _lora_linear_grad(ctx, grad_out, _grad_u):
    x, u, seed, *flat = ctx.saved_tensors
    lists = []
    for length in ctx.list_lengths:
        lists.append(flat[:length])
        flat = flat[length:]
    *frozen_lists, lora_a, lora_b = lists
    input_grad = ctx.needs_input_grad[0]
    grad_x, grad_a, grad_b = lora_linear_backward(grad_out.contiguous(), x, u, *frozen_lists, *ctx.frozen_settings,
                                                  lora_a, lora_b, seed, ctx.p, ctx.scaling, input_grad)
    # no gradient for the frozen layers, their settings and biases: a None per tensor of each list
    no_grads = [[None] * len(tensors) for tensors in frozen_lists] + [None] * _FROZEN_SETTINGS + [[None] * ctx.bias_count]
    return grad_x if input_grad else None, *no_grads, grad_a, grad_b, None, None, None


lora_linear.register_autograd(_lora_linear_grad, setup_context=_lora_linear_setup)


def frozen_operands(base: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple | None:
    """The frozen layer `base` as stacked_operands takes it: (weight, absmax, code, nested_absmax,
    nested_code, offset, quant_type, blocksize, nested_blocksize, shape, bias), None for what it lacks;
    or None when lora_linear would not compute what the layer's own forward does with x: it must be a
    bitsandbytes 4-bit layer computing in `dtype` (its weight packed as bitsandbytes' own matmul reads
    it, [out, in]) or a plain linear layer whose weight is of `dtype`; frozen, bias included
    (lora_linear gives them no gradient); on x's device; with no hooks around its forward (accelerate's
    offload hooks bring the weights there)."""
    import bitsandbytes as bnb

    weight, bias = base.weight, base.bias
    if (x.dtype != dtype or weight.device != x.device or weight.requires_grad
            or (bias is not None and (bias.dtype != dtype or bias.requires_grad))
            or hasattr(base, "_hf_hook") or base._forward_hooks or base._forward_pre_hooks):
        return None
    if type(base) is torch.nn.Linear:
        return (weight, None, None, None, None, None, "", 0, 0, list(weight.shape), bias) \
            if weight.dtype == dtype and type(weight.data) is torch.Tensor else None
    state = getattr(weight, "quant_state", None)
    if (type(base) is not bnb.nn.Linear4bit or base.compute_dtype != dtype or state is None
            or getattr(state, "packing_format_for_cpu", False)
            or list(state.shape) != [base.out_features, base.in_features]):
        return None
    from finetune.speed.dequant_kernels import quant_state_operands

    return weight, *quant_state_operands(state), bias


def stacked_operands(layers: list[tuple]) -> tuple | None:
    """lora_linear's arguments for frozen layers read by one input (frozen_operands of each): (weights,
    absmax, code, nested_absmax, nested_code, offset, quant_type, blocksize, nested_blocksize,
    out_features, biases), a list per layer for each tensor, empty where no layer has it; None where
    the layers cannot be stacked: of different kinds (plain, 4-bit, nested or not, another quant type
    or block size), widths or devices, or some with a bias and some without."""
    first = layers[0]
    if any(layer[6:9] != first[6:9] or layer[9][1] != first[9][1] or layer[0].device != first[0].device
           or [t is None for t in layer[1:6] + (layer[10],)] != [t is None for t in first[1:6] + (first[10],)]
           for layer in layers[1:]):
        return None
    lists = [[layer[i] for layer in layers] if first[i] is not None else [] for i in range(6)]
    biases = [layer[10] for layer in layers] if first[10] is not None else []
    return *lists, *first[6:9], [layer[9][0] for layer in layers], biases


def fusable(layer: torch.nn.Module) -> bool:
    """A PEFT LoRA layer over a linear base (plain, 4-bit or 8-bit) that fused_forward computes in full."""
    from peft.tuners.lora import LoraLayer

    return (isinstance(layer, LoraLayer) and isinstance(layer.get_base_layer(), torch.nn.Linear)
            and not getattr(layer, "fan_in_fan_out", False))


def _dropout_p(layer, adapter: str) -> float:
    """The adapter's dropout probability in this mode."""
    dropout = layer.lora_dropout[adapter]
    return dropout.p if layer.training and isinstance(dropout, torch.nn.Dropout) else 0.0


def _mask_seed(p: float, x: torch.Tensor) -> torch.Tensor:
    """A fresh seed for a dropout mask (a zero placeholder without dropout)."""
    return (torch.randint(-2**31, 2**31 - 1, (), device=x.device, dtype=torch.int32) if p > 0
            else torch.zeros((), device=x.device, dtype=torch.int32))


def _peft_only(layer, kwargs: dict) -> bool:
    """What fused_forward leaves to PEFT's own forward: adapters disabled or merged, mixed adapter
    batches, DoRA and other variants, a bias on lora_B."""
    return (layer.disable_adapters or layer.merged or kwargs.get("adapter_names") is not None
            or any(a in layer.lora_variant or layer.lora_B[a].bias is not None
                   for a in layer.active_adapters if a in layer.lora_A))


def _one_op_parts(layer, x: torch.Tensor) -> tuple | None:
    """(frozen operands, A, B, dropout p, scaling) of a layer that runs as (part of) one lora_linear on x:
    one active adapter over a 4-bit or plain frozen layer of the input's dtype; else None."""
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1 or _peft_only(layer, {}):
        return None
    adapter = adapters[0]
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else a.dtype
    frozen = frozen_operands(layer.base_layer, x, dtype)
    return None if frozen is None else (frozen, a, b, _dropout_p(layer, adapter), layer.scaling[adapter])


def _run_as_one_op(parts: list[tuple], x: torch.Tensor) -> torch.Tensor | None:
    """lora_linear of the layers' _one_op_parts on x: their outputs side by side, [..., sum of out]; None
    where they cannot be one op (see stacked_operands; and one dropout p, scaling and adapter dtype)."""
    operands = stacked_operands([frozen for frozen, *_ in parts])
    first = parts[0]
    if operands is None or any((a.dtype, b.dtype, p, s) != (first[1].dtype, first[2].dtype, first[3], first[4])
                               for _, a, b, p, s in parts[1:]):
        return None
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out, _ = lora_linear(flat, *operands, [a for _, a, *_ in parts], [b for _, _, b, *_ in parts],
                         _mask_seed(first[3], x), first[3], first[4])
    return out.view(*x.shape[:-1], out.shape[-1])


class SharedInput:
    """LoRA layers that a block calls one after another on one input, such as q, k and v (the names in
    SHARED_INPUT_LAYERS). The first of them (q) runs all of them as one lora_linear (one frozen matmul
    of their stacked weights, one pass of each LoRA kernel over the input, one dropout mask) and keeps
    the others' outputs, each for that very input (`is`), until it is called. Any other call runs its
    layer alone and drops what is kept, so a model that calls them another way gets the same results,
    only without the saving, and at most one set of outputs is ever kept."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.layers = layers
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """Layer `index`'s output for x from the layers' one op, or None where the layer runs alone."""
        kept = self.kept.pop(index, None)
        if kept is not None and kept[0] is x:
            return kept[1]
        self.kept.clear()
        if index != 0:
            return None
        parts = [_one_op_parts(layer, x) for layer in self.layers]
        if any(part is None for part in parts):
            return None
        out = _run_as_one_op(parts, x)
        if out is None:
            return None
        outputs = out.split([frozen[9][0] for frozen, *_ in parts], -1)
        self.kept = {i: (x, y) for i, y in enumerate(outputs) if i != index}
        return outputs[index]


# Sibling layers that transformers' decoder blocks call on one input (llama, mistral, qwen, gemma and
# others): attention's query, key and value projections, and the gated MLP's gate and up projections.
SHARED_INPUT_LAYERS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A PEFT LoRA linear layer's forward with the low-rank path in lora_down: with one adapter over a
    4-bit or plain frozen layer of the input's dtype, the whole layer in one op (lora_linear), shared
    with its siblings on the same input (SharedInput); else the frozen layer's own forward and one addmm
    per adapter.

    Whatever this does not cover (adapters disabled or merged, mixed adapter batches, DoRA and other
    variants, a bias on lora_B) goes through PEFT's own forward.
    """
    if _peft_only(self, kwargs):
        return self.finetune_peft_forward(x, *args, **kwargs)
    if not args and not kwargs:
        shared = getattr(self, "finetune_shared_input", None)
        if shared is not None:
            out = shared[0].output(shared[1], x)
            if out is not None:
                return out
        parts = _one_op_parts(self, x)
        if parts is not None:
            return _run_as_one_op([parts], x)
    autocast = torch.is_autocast_enabled(x.device.type)
    flat = x.reshape(-1, x.shape[-1])
    result = self.base_layer(x, *args, **kwargs)
    out = result.reshape(-1, result.shape[-1])
    for adapter in [a for a in self.active_adapters if a in self.lora_A]:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        # PEFT's dtypes: the autocast dtype under autocast, else the adapter's own, the sum in the result's.
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else a.dtype
        p = _dropout_p(self, adapter)
        u = lora_down(flat.to(dtype).contiguous(), a.to(dtype), _mask_seed(p, x), p)
        with torch.autocast(x.device.type, enabled=False):
            if out.dtype == dtype:
                out = torch.addmm(out, u, b.to(dtype).t(), alpha=self.scaling[adapter])
            else:
                out = out + (torch.mm(u, b.to(dtype).t()) * self.scaling[adapter]).to(out.dtype)
    return out.view(result.shape)


def fuse_lora_layers(model: torch.nn.Module, shared_input: bool = True) -> int:
    """Give every fusable LoRA layer fused_forward; returns how many. PEFT's forward is kept on the
    layer (finetune_peft_forward) for what fused_forward does not cover. With `shared_input`, the
    fused siblings named in SHARED_INPUT_LAYERS that read inputs of one width run as one op (SharedInput)."""
    fused = 0
    for module in model.modules():
        if fusable(module) and not hasattr(module, "finetune_peft_forward"):
            module.finetune_peft_forward = module.forward
            module.forward = types.MethodType(fused_forward, module)
            fused += 1
            for adapter in module.lora_A.values():
                if adapter.weight.device.type in ("cuda", "cpu"):
                    keep_arrival_counts(adapter.weight.device)
    if shared_input:
        for module in model.modules():
            for names in SHARED_INPUT_LAYERS:
                layers = [getattr(module, name, None) for name in names]
                if (all(hasattr(layer, "finetune_peft_forward") for layer in layers)
                        and len({layer.get_base_layer().in_features for layer in layers}) == 1):
                    shared = SharedInput(layers)
                    for index, layer in enumerate(layers):
                        layer.finetune_shared_input = (shared, index)
    return fused


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
