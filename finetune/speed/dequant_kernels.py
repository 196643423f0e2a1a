"""bitsandbytes' 4-bit weights (NF4, FP4; nested absmax or not) dequantized by one Triton kernel.

bitsandbytes dequantizes a nested ("double quantized") weight in two CUDA kernels: the 8-bit absmax
first, to an fp32 tensor, then the 4-bit values. This kernel does both in one pass over the packed
bytes, each quantization block's scale computed once per tile row, and gives the same result bit for
bit, rounding where bitsandbytes rounds:

    scale = code2[absmax8[b]] * absmax2[b // nested_blocksize]   fp32 (dequantize_blockwise)
    scale = scale + offset                                        fp32, a separate add (no FMA)
    out   = (code[nibble] * scale).to(dtype)                      fp32 product, rounded once

Element 2i is the high nibble of byte i, element 2i + 1 the low one. A tile is ROWS x ROW_BYTES packed
bytes, every row inside one quantization block, so the block's scale is a [ROWS] vector. Offsets are
int64: a weight's element count can pass 2**31.

The op registers without importing Triton; the kernel is defined on first use, after TRITON_INTERPRET
has chosen between the GPU and Triton's CPU interpreter (tests/test_dequant_4bit.py runs it there).
"""

import functools
import math
from typing import Optional

import torch

# Packed bytes per program (a power of two) and warps; scripts/dequant_check.py --sweep times the alternatives on a GPU.
LAUNCH = dict(TILE_BYTES=2048, num_warps=4)

tl = None  # triton.language, imported by _kernel(): the kernel looks it up among this module's globals


@functools.cache
def _kernel():
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_4bit_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                               out_ptr, n, n_bytes, nested_blocksize, ROWS: tl.constexpr, ROW_BYTES: tl.constexpr,
                               BLOCK_BYTES: tl.constexpr, NESTED: tl.constexpr, ROUND_BF16: tl.constexpr):
        row_starts = tl.program_id(0).to(tl.int64) * (ROWS * ROW_BYTES) + tl.arange(0, ROWS) * ROW_BYTES
        row_in = row_starts < n_bytes
        blocks = row_starts // BLOCK_BYTES
        if NESTED:
            scale = (tl.load(nested_code_ptr + tl.load(absmax_ptr + blocks, mask=row_in, other=0))
                     * tl.load(nested_absmax_ptr + blocks // nested_blocksize, mask=row_in, other=0.0))
            scale = scale + tl.load(offset_ptr)  # kept apart from the product by enable_fp_fusion=False
        else:
            scale = tl.load(absmax_ptr + blocks, mask=row_in, other=0.0).to(tl.float32)
        byte_offsets = row_starts[:, None] + tl.arange(0, ROW_BYTES)[None, :]
        packed = tl.load(packed_ptr + byte_offsets, mask=byte_offsets < n_bytes, other=0).to(tl.int32)
        values = tl.interleave(tl.load(code_ptr + (packed >> 4)), tl.load(code_ptr + (packed & 15))) * scale[:, None]
        if ROUND_BF16:  # fp32 -> bf16 to nearest even by hand: Triton's CPU interpreter truncates
            bits = values.to(tl.uint32, bitcast=True)
            bits = tl.where(values != values, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            rounded = values.to(out_ptr.dtype.element_ty)
        elements = 2 * row_starts[:, None] + tl.arange(0, 2 * ROW_BYTES)[None, :]
        tl.store(out_ptr + elements, rounded, mask=elements < n)

    return dequantize_4bit_kernel


@torch.library.custom_op("finetune::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, rows: int,
                       cols: int, dtype: torch.dtype, nested_absmax: Optional[torch.Tensor] = None,
                       nested_code: Optional[torch.Tensor] = None, offset: Optional[torch.Tensor] = None,
                       nested_blocksize: int = 256) -> torch.Tensor:
    """The [rows, cols] weight of `dtype` from its packed 4-bit values (uint8, two per byte), `code` (the
    16-entry fp32 table) and absmax per block of `blocksize` elements: fp32, or with nested_absmax,
    nested_code and offset, uint8 indices into nested_code, scaled per nested_blocksize of them."""
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two, got {blocksize}")
    nested = nested_absmax is not None
    out = torch.empty(rows, cols, device=packed.device, dtype=dtype)
    n = rows * cols
    if n == 0:
        return out
    n_bytes = (n + 1) // 2  # the last byte's low nibble is padding when n is odd
    tile_bytes = LAUNCH["TILE_BYTES"]
    row_bytes = min(blocksize // 2, tile_bytes)
    _kernel()[(-(-n_bytes // tile_bytes),)](
        packed.reshape(-1).view(torch.uint8), absmax, code, nested_absmax if nested else absmax,
        nested_code if nested else code, offset if nested else absmax, out, n, n_bytes, nested_blocksize,
        ROWS=tile_bytes // row_bytes, ROW_BYTES=row_bytes, BLOCK_BYTES=blocksize // 2, NESTED=nested,
        ROUND_BF16=dtype == torch.bfloat16 and not packed.is_cuda, num_warps=LAUNCH["num_warps"],
        enable_fp_fusion=False)
    return out


@dequantize_4bit_op.register_fake
def _(packed, absmax, code, blocksize, rows, cols, dtype, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256):
    return packed.new_empty(rows, cols, dtype=dtype)


def frozen_weight(weight: torch.Tensor, absmax: torch.Tensor | None, code: torch.Tensor | None,
                  nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
                  quant_type: str, blocksize: int, nested_blocksize: int, shape: list[int],
                  dtype: torch.dtype) -> torch.Tensor:
    """The frozen layer's [out, in] weight in `dtype`: a plain weight as it is, a bitsandbytes 4-bit one
    dequantized (with its nested absmax, double quantization) as bitsandbytes' own 4-bit matmul does: on
    a GPU by dequantize_4bit_op above (the same bits), elsewhere by bitsandbytes itself."""
    if absmax is None:
        return weight
    if weight.is_cuda:
        return dequantize_4bit_op(weight, absmax, code, blocksize, shape[0], shape[1], dtype, nested_absmax,
                                  nested_code, offset, nested_blocksize)
    if nested_absmax is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, nested_absmax, nested_code,
                                                                     nested_blocksize, torch.float32) + offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax, blocksize, quant_type, shape, dtype)


def quant_state_operands(quant_state) -> tuple:
    """A bitsandbytes 4-bit QuantState as the training step's kernels take it: (absmax, code,
    nested_absmax, nested_code, offset, quant_type, blocksize, nested_blocksize, shape), the nested
    entries None (and 0) without double quantization. The step's one-op LoRA layer
    (finetune.speed.fused_lora.frozen_operands) and dequantize_4bit below both unpack it here, so what
    scripts/dequant_check.py and tests/test_dequant_4bit.py check bit for bit is what the step runs."""
    nested = quant_state.state2 if quant_state.nested else None
    return (quant_state.absmax, quant_state.code, nested and nested.absmax, nested and nested.code,
            quant_state.offset if nested else None, quant_state.quant_type, quant_state.blocksize,
            nested.blocksize if nested else 0, list(quant_state.shape))


def dequantize_4bit(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit(packed, quant_state) by the op: the weight of
    quant_state.shape and quant_state.dtype."""
    absmax, code, nested_absmax, nested_code, offset, _, blocksize, nested_blocksize, shape = \
        quant_state_operands(quant_state)
    rows = shape[0] if shape else 1
    cols = math.prod(shape) // rows if rows else 0
    out = dequantize_4bit_op(packed, absmax, code, blocksize, rows, cols, quant_state.dtype, nested_absmax,
                             nested_code, offset, nested_blocksize or 256).view(shape)
    # bitsandbytes' shim for a weight packed as [1, bytes] (the transposed layout): the result transposed
    return out.t() if packed.shape[0] == 1 else out
