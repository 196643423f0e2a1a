"""Triton kernels for LoRA's down-projection with its dropout (finetune/speed/fused_lora.py holds the ops).

    u      = (x * keep * scale) @ A.T                         lora_down_kernel (per column split)
    grad_A = grad_u.T @ (x * keep * scale)                    lora_down_grad_weight_kernel (per row split)
    grad_x = (grad_u @ A) * keep * scale                      lora_down_grad_input_kernel

x is [M, K] (tokens x in features), A [R, K], u and grad_u [M, R]; scale is 1 / (1 - p), times LoRA's
scaling where the caller folds it in. A is read in its own dtype (an fp32 adapter) and rounded to x's
in registers, so no rounded copy of it is written first. The dropout mask is never stored:
each kernel recomputes an element's keep bit from (seed, row, column) while its tile of x or grad_x is
in registers, so the dropped copy of x that nn.Dropout writes (and that backward reads again) never
exists. The keep bits come from murmur3's 32-bit finalizer of the row's hash and the column pair
(columns 2j and 2j + 1): its low 16 bits decide column 2j, its high 16 bits column 2j + 1, each kept
at or above a 16-bit threshold (probability 1 - p, p rounded to a multiple of 2**-16). One hash per
two elements: the hash's integer arithmetic, not memory, bounded these kernels (scripts/
fused_lora_check.py --p 0 times them without it; docs/decisions.md). int32 products wrap, as the hash
needs; `>>` on int32 copies the sign bit, so each shift is masked to a logical one.

Row offsets are int64: at long context M x K passes 2**31.
"""

import triton
import triton.language as tl

FMIX_1 = tl.constexpr(0x85EBCA6B - 2**32)  # murmur3's fmix32 multipliers, as int32
FMIX_2 = tl.constexpr(0xC2B2AE35 - 2**32)
GOLDEN = tl.constexpr(0x9E3779B9 - 2**32)  # spreads row indices before their own finalizer
COLUMN = tl.constexpr(0x27D4EB2F)  # spreads column indices


@triton.jit
def fmix32(h):
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * FMIX_1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * FMIX_2
    return h ^ ((h >> 16) & 0xFFFF)


@triton.jit
def row_hashes(seed_ptr, rows):
    return fmix32(rows * GOLDEN + tl.load(seed_ptr))


@triton.jit
def kept(row_hash, cols, threshold):
    """[rows, cols] keep bits, cols consecutive from an even column: one hash per column pair, its low
    16 bits for the even column and its high 16 bits for the odd one, at or above the threshold."""
    even, _ = tl.split(tl.reshape(cols, [cols.shape[0] // 2, 2]))
    h = fmix32(row_hash[:, None] ^ ((even >> 1) * COLUMN)[None, :])
    low, high = (h & 0xFFFF) >= threshold, ((h >> 16) & 0xFFFF) >= threshold
    return tl.reshape(tl.join(low, high), [row_hash.shape[0], cols.shape[0]])


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST computes in fp32: Triton's CPU interpreter gets bf16 dot products wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def lora_down_kernel(x_ptr, a_ptr, part_ptr, seed_ptr, M, K, cols_per_split, threshold, scale,
                     R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """part[split] = dropped x[rows, columns of split] @ A[:, columns of split].T, for one block of rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    row_in = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * K
    if DROPOUT:
        row_hash = row_hashes(seed_ptr, rows)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, K)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + cols[None, :], mask=row_in[:, None] & (cols[None, :] < end), other=0.0)
        if DROPOUT:
            x = tl.where(kept(row_hash, cols, threshold), x, 0.0).to(x_ptr.dtype.element_ty)
        a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=(ranks[None, :] < R) & (cols[:, None] < end),
                    other=0.0).to(x_ptr.dtype.element_ty)
        acc = mma(x, a, acc, PRECISION, UPCAST)
    tl.store(part_ptr + split * M * R + rows[:, None] * R + ranks[None, :], acc * scale,
             mask=row_in[:, None] & (ranks[None, :] < R))


@triton.jit
def lora_down_grad_weight_kernel(g_ptr, x_ptr, part_ptr, seed_ptr, M, K, rows_per_split, threshold, scale,
                                 R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """part[split] = grad_u[rows of split].T @ dropped x[rows of split], for one block of columns."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, R_PAD)
    col_in = cols < K
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, M)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_in = rows < end
        g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=row_in[:, None] & (ranks[None, :] < R),
                    other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=row_in[:, None] & col_in[None, :],
                    other=0.0)
        if DROPOUT:
            x = tl.where(kept(row_hashes(seed_ptr, rows), cols, threshold), x, 0.0).to(x_ptr.dtype.element_ty)
        acc = mma(tl.trans(g), x, acc, PRECISION, UPCAST)
    tl.store(part_ptr + split * R * K + ranks[:, None] * K + cols[None, :], acc * scale,
             mask=(ranks[:, None] < R) & col_in[None, :])


@triton.jit
def lora_down_grad_input_kernel(g_ptr, a_ptr, out_ptr, seed_ptr, M, K, threshold, scale,
                                R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R_PAD)
    row_in = rows < M
    col_in = cols < K
    g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=row_in[:, None] & (ranks[None, :] < R), other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & col_in[None, :],
                other=0.0).to(g_ptr.dtype.element_ty)
    y = mma(g, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PRECISION, UPCAST) * scale
    if DROPOUT:
        y = tl.where(kept(row_hashes(seed_ptr, rows), cols, threshold), y, 0.0)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=row_in[:, None] & col_in[None, :])
