"""The frozen 4-bit layers' matmuls in FP8 (speed.fp8_frozen_matmuls).

The frozen matmuls are two thirds of a llama3-8b step on an H200, and the step runs at the card's power
limit (docs/decisions.md): only less work per token makes it faster. An FP8 (e4m3) matmul does the same
multiply-adds in 0.53-0.59 of a bf16 one's time there (docs/decisions.md). Here each frozen layer's
forward and its input gradient run in FP8; the adapter's path (finetune/speed/fused_lora.py), the
adapter's gradients, attention, norms and the LM head stay as they were.

    forward   y      = scaled_mm(rows_fp8(x), W8.T)        * x_scale[m] * w_scale   (+ adapter, bias)
    backward  grad_x = scaled_mm(rows_fp8(grad_y), W8T.T)  * g_scale[m] * w_scale   (+ adapter's share)

- W8 is the 4-bit weight dequantized straight to e4m3 by one Triton kernel, divided by the weight's one
  scale (its largest magnitude / 448, found once when the layers are fused: the weight is frozen). An
  NF4 weight is 16 levels times a per-block scale, its smallest non-zero level 0.08 of the block's: as
  long as its block scales span less than a factor of about 2,000, every non-zero value lands among
  e4m3's normal numbers (448 down to 2**-6) under one scale. W8T, backward's operand, is written
  transposed by the same kernel (a transposed copy of W8 in torch took about as long as the matmul it
  feeds: docs/decisions.md).
- Activations and output gradients are scaled per row (per token), as torchao's row-wise recipe does: a
  token with large activations does not push the others toward e4m3's subnormals.
- The forward product accumulates fast (use_fast_accum), the input gradient's does not, as torchao's
  defaults do for the output and the input-gradient matmuls.

e4m3 keeps 3 bits of mantissa: each product's inputs are rounded by up to 1/16. A llama3-8b layer's
output is 3.7e-2 from fp32 in norm (2.9e-3 in bf16), and over 16 steps the loss stayed within 0.063 of
the HF recipe's (README); the test holds a tiny model's loss and gradients within 1% and 5% of bf16's.

A call whose shapes torch's FP8 matmul does not take (any of tokens, in or out features not a multiple
of 16), or a block size that does not divide the in features, runs in bf16 as before.

On the CPU (tests) the same arithmetic runs in torch (bitsandbytes' dequantization, torch's FP8 cast and
matmul); the Triton kernels run there in Triton's interpreter, checked bit for bit against it
(tests/test_fp8.py).
"""

from __future__ import annotations

import functools

import torch

from finetune.speed.dequant_kernels import frozen_weight

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SMALLEST_ROW_MAX = 1e-30  # a row of zeros (padding) gets this scale: 448 / it stays finite in fp32
# Tile of the weight per program: rows x columns of the [out, in] weight (columns a multiple of the
# quantization block), and warps; the transposed write wants square tiles for its shared-memory transpose.
LAUNCH = {
    "weight": dict(TILE_ROWS=16, TILE_COLS=512, num_warps=4),
    "weight_transposed": dict(TILE_ROWS=64, TILE_COLS=64, num_warps=4),
    "rows": dict(BLOCK=2048, num_warps=8),
}

# triton.language and the kernels' helper, set by _kernels(): Triton looks them up among this module's globals
tl = None
e4m3 = None


@functools.cache
def _kernels():
    global tl, e4m3
    import triton
    import triton.language as tl

    @triton.jit
    def e4m3_cast(values, E4M3_MAX: tl.constexpr, INTERPRETER: tl.constexpr):
        """fp32 values clamped to e4m3's range and cast. Triton's CPU interpreter casts to e4m3 wrongly
        (it truncates, and misses binades), but casts values already on e4m3's grid exactly: there they
        are rounded to the grid by hand first, to nearest even (3 mantissa bits; 2**-9 steps below 2**-6)."""
        values = tl.clamp(values, -E4M3_MAX, E4M3_MAX)
        if INTERPRETER:
            bits = values.to(tl.int32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
            magnitude = ((tl.abs(values) * 512.0 + 12582912.0) - 12582912.0) / 512.0  # 1.5 * 2**23 rounds to integers
            subnormal = (magnitude.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
            values = tl.where(tl.abs(values) < 0.015625, subnormal, normal)
        return values.to(tl.float8e4nv)

    e4m3 = e4m3_cast

    @triton.jit
    def dequantize_4bit_e4m3_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                                    scale_ptr, out_ptr, rows, cols, nested_blocksize, BLOCKSIZE: tl.constexpr,
                                    TILE_ROWS: tl.constexpr, TILE_COLS: tl.constexpr, NESTED: tl.constexpr,
                                    TRANSPOSE: tl.constexpr, E4M3_MAX: tl.constexpr, INTERPRETER: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * TILE_ROWS + tl.arange(0, TILE_ROWS)
        tile_start = tl.program_id(1).to(tl.int64) * TILE_COLS
        c = tile_start + tl.arange(0, TILE_COLS)
        row_in = r < rows
        # one scale per quantization block: a tile row holds TILE_COLS // BLOCKSIZE whole blocks, as the
        # columns are a multiple of BLOCKSIZE
        GROUPS: tl.constexpr = TILE_COLS // BLOCKSIZE
        blocks = (r[:, None] * cols + tile_start) // BLOCKSIZE + tl.arange(0, GROUPS)[None, :]
        block_in = row_in[:, None] & (tile_start + tl.arange(0, GROUPS)[None, :] * BLOCKSIZE < cols)
        if NESTED:
            scale = (tl.load(nested_code_ptr + tl.load(absmax_ptr + blocks, mask=block_in, other=0))
                     * tl.load(nested_absmax_ptr + blocks // nested_blocksize, mask=block_in, other=0.0))
            scale = scale + tl.load(offset_ptr)  # kept apart from the product by enable_fp_fusion=False
        else:
            scale = tl.load(absmax_ptr + blocks, mask=block_in, other=0.0).to(tl.float32)
        pairs = tl.arange(0, TILE_COLS // 2)  # element 2j is byte j's high nibble, 2j + 1 its low one
        pair_in = row_in[:, None] & (tile_start + 2 * pairs[None, :] < cols)
        packed = tl.load(packed_ptr + (r[:, None] * cols + tile_start) // 2 + pairs[None, :], mask=pair_in,
                         other=0).to(tl.int32)
        values = tl.interleave(tl.load(code_ptr + (packed >> 4)), tl.load(code_ptr + (packed & 15)))
        values = tl.reshape(tl.reshape(values, [TILE_ROWS, GROUPS, BLOCKSIZE]) * scale[:, :, None],
                            [TILE_ROWS, TILE_COLS])
        weight = e4m3(values * tl.math.div_rn(1.0, tl.load(scale_ptr)), E4M3_MAX, INTERPRETER)  # IEEE, as torch's
        if TRANSPOSE:  # [in, out]: consecutive rows of the weight are consecutive in memory
            tl.store(out_ptr + c[:, None] * rows + r[None, :], tl.trans(weight),
                     mask=(c[:, None] < cols) & row_in[None, :])
        else:
            tl.store(out_ptr + r[:, None] * cols + c[None, :], weight, mask=row_in[:, None] & (c[None, :] < cols))

    @triton.jit
    def rows_e4m3_kernel(x_ptr, out_ptr, scale_ptr, cols, BLOCK: tl.constexpr, E4M3_MAX: tl.constexpr,
                         SMALLEST_ROW_MAX: tl.constexpr, INTERPRETER: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * cols
        offsets = tl.arange(0, BLOCK)
        largest = tl.zeros([BLOCK], dtype=tl.float32)
        poison = tl.zeros([BLOCK], dtype=tl.float32)  # v * 0: NaN where v is NaN or infinite
        for start in range(0, cols, BLOCK):
            v = tl.load(x_ptr + row + start + offsets, mask=start + offsets < cols, other=0.0).to(tl.float32)
            largest = tl.maximum(largest, tl.abs(v))
            poison += v * 0.0
        # a max may pass over NaN, a sum does not; IEEE divisions (div_rn), as torch's: a plain `/` may be
        # approximate on a GPU
        scale = tl.math.div_rn(tl.maximum(tl.max(largest, axis=0), SMALLEST_ROW_MAX), E4M3_MAX) + tl.sum(poison, axis=0)
        inverse = tl.math.div_rn(1.0, scale)
        for start in range(0, cols, BLOCK):
            v = tl.load(x_ptr + row + start + offsets, mask=start + offsets < cols, other=0.0).to(tl.float32)
            tl.store(out_ptr + row + start + offsets, e4m3(v * inverse, E4M3_MAX, INTERPRETER),
                     mask=start + offsets < cols)
        tl.store(scale_ptr + tl.program_id(0), scale)

    return dequantize_4bit_e4m3_kernel, rows_e4m3_kernel


def layer_runs_in_fp8(shape: list[int], blocksize: int) -> bool:
    """Whether a frozen 4-bit layer of `shape` [out, in] can run in FP8: torch's FP8 matmul takes
    dimensions that are multiples of 16, and the kernel's tiles hold whole quantization blocks, so the
    in features must be a multiple of the block size."""
    out_features, in_features = shape
    return out_features % 16 == 0 and in_features % 16 == 0 and blocksize > 0 and in_features % blocksize == 0


def runs_in_fp8(tokens: int, shape: list[int], blocksize: int) -> bool:
    """Whether a call of such a layer on `tokens` rows of input runs in FP8: the token count must be a
    multiple of 16 as well (preflight asks for batch widths that make it so)."""
    return tokens % 16 == 0 and layer_runs_in_fp8(shape, blocksize)


def weight_scale(frozen_weight_fp32: torch.Tensor) -> torch.Tensor:
    """The frozen weight's one FP8 scale, its largest magnitude / 448, repeated as a [1, max(out, in)]
    fp32 row: torch's row-wise FP8 matmul takes a scale per output column, which are the out features
    forward and the in features for the input gradient (each a slice of the row)."""
    largest = frozen_weight_fp32.abs().amax().clamp_min(SMALLEST_ROW_MAX)
    return (largest / E4M3_MAX).expand(1, max(frozen_weight_fp32.shape)).contiguous()


def dequantize_4bit_e4m3(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                         offset: torch.Tensor | None, scale: torch.Tensor, blocksize: int, nested_blocksize: int,
                         shape: list[int], transposed: bool) -> torch.Tensor:
    """The 4-bit weight of `shape` [out, in] (bitsandbytes' packing, as dequant_kernels reads it) divided
    by `scale`'s first entry, in e4m3, by one Triton kernel: [out, in], or [in, out] when `transposed`.
    On the CPU it runs in Triton's interpreter (TRITON_INTERPRET=1, tests)."""
    rows, cols = shape
    if blocksize < 2 or blocksize & (blocksize - 1) or cols % blocksize:
        raise ValueError(f"the in features ({cols}) must be a multiple of the block size ({blocksize}), a power of two")
    out = torch.empty((cols, rows) if transposed else (rows, cols), device=packed.device, dtype=E4M3)
    launch = dict(LAUNCH["weight_transposed" if transposed else "weight"])
    launch["TILE_COLS"] = max(launch["TILE_COLS"], blocksize)
    nested = nested_absmax is not None
    grid = (-(-rows // launch["TILE_ROWS"]), -(-cols // launch["TILE_COLS"]))
    _kernels()[0][grid](packed.reshape(-1).view(torch.uint8), absmax, code, nested_absmax if nested else absmax,
                        nested_code if nested else code, offset if nested else absmax, scale, out, rows, cols,
                        nested_blocksize or 256, BLOCKSIZE=blocksize, NESTED=nested, TRANSPOSE=transposed,
                        E4M3_MAX=E4M3_MAX, INTERPRETER=not packed.is_cuda, enable_fp_fusion=False, **launch)
    return out


def rows_to_e4m3_by_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows_to_e4m3 by one Triton kernel (one program per row); on the CPU in Triton's interpreter."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"rows_to_e4m3 takes a contiguous [rows, columns] tensor (got {list(x.shape)}, "
                         f"contiguous: {x.is_contiguous()})")
    rows, cols = x.shape
    out = torch.empty(rows, cols, device=x.device, dtype=E4M3)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    if rows:
        _kernels()[1][(rows,)](x, out, scale, cols, E4M3_MAX=E4M3_MAX, SMALLEST_ROW_MAX=SMALLEST_ROW_MAX,
                               INTERPRETER=not x.is_cuda, **LAUNCH["rows"])
    return out, scale


def rows_to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as e4m3 and its [M, 1] fp32 scales: each row divided by its largest magnitude / 448
    (a row of zeros by SMALLEST_ROW_MAX / 448). A NaN or inf in a row makes its scale NaN, so the step's
    loss is NaN and the step is skipped, as in bf16 (saturating to e4m3's largest would hide an inf)."""
    if x.is_cuda:
        return rows_to_e4m3_by_kernel(x)
    x32 = x.float()
    scale = x32.abs().amax(dim=1, keepdim=True).clamp_min(SMALLEST_ROW_MAX) / E4M3_MAX + (x32 * 0).sum(1, keepdim=True)
    return (x32 * (1.0 / scale)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def frozen_weight_e4m3(weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                       nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                       offset: torch.Tensor | None, scale: torch.Tensor, quant_type: str, blocksize: int,
                       nested_blocksize: int, shape: list[int], transposed: bool) -> torch.Tensor:
    """The frozen 4-bit weight / scale in e4m3, [out, in] or [in, out] when `transposed`: on a GPU by
    dequantize_4bit_e4m3, elsewhere bitsandbytes' fp32 dequantization cast by torch (the same numbers)."""
    if weight.is_cuda:
        return dequantize_4bit_e4m3(weight, absmax, code, nested_absmax, nested_code, offset, scale, blocksize,
                                    nested_blocksize, shape, transposed)
    w = frozen_weight(weight, absmax, code, nested_absmax, nested_code, offset, quant_type, blocksize,
                      nested_blocksize, shape, torch.float32)
    w8 = (w * (1.0 / scale[0, 0])).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return w8.t().contiguous() if transposed else w8


def frozen_forward(x: torch.Tensor, *frozen) -> torch.Tensor:
    """x @ W.T in x's dtype by an FP8 matmul, for x [M, K] and the frozen 4-bit W [N, K]; `frozen` is
    frozen_weight_e4m3's arguments before `transposed` (weight .. offset, scale, quant_type .. shape)."""
    w8, scale = frozen_weight_e4m3(*frozen, transposed=False), frozen[6]
    x8, x_scale = rows_to_e4m3(x)
    return torch._scaled_mm(x8, w8.t(), x_scale, scale[:, :w8.shape[0]], out_dtype=x.dtype, use_fast_accum=True)


def frozen_input_grad(grad_out: torch.Tensor, *frozen) -> torch.Tensor:
    """grad_out @ W in grad_out's dtype by an FP8 matmul: the frozen layer's share of its input's gradient."""
    w8t, scale = frozen_weight_e4m3(*frozen, transposed=True), frozen[6]
    g8, g_scale = rows_to_e4m3(grad_out)
    return torch._scaled_mm(g8, w8t.t(), g_scale, scale[:, :w8t.shape[0]], out_dtype=grad_out.dtype)
