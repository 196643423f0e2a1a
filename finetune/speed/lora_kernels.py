"""Triton kernels for LoRA's down-projection with its dropout (finetune/speed/fused_lora.py holds the ops).

    u      = (x * keep * scale) @ A.T                         lora_down_kernel (per column split)
    grad_A = grad_u.T @ (x * keep * scale)                    lora_down_grad_weight_kernel (per row split)
    grad_x = (grad_u @ A) * keep * scale  (+ addend)          lora_down_grad_input_kernel
    grad_u = grad_out @ B,  grad_B = grad_out.T @ u           lora_up_grads_kernel (one pass over grad_out)

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

A reduction split over programs (to fill the GPU) ends inside the kernel: each split stores its fp32
partial sum, and the program that finishes a tile's last split (an atomic count per tile, which it
sets back to 0) adds the partials in split order and writes the result. So there is no sum kernel
after, and no atomics on the values: the same inputs give the same bits.

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
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + a @ b, in fp32 in Triton's CPU interpreter, which gets bf16 dot products wrong."""
    if INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def rounded(value, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """value in dtype, fp32 rounded to the nearest bf16 (ties to even) as a GPU rounds it. Triton's CPU
    interpreter cuts the low bits off instead, so there the rounding is done on the bits first: the
    tests' sums of many bf16 values would otherwise drift toward zero."""
    if INTERPRETER and dtype == tl.bfloat16 and value.dtype == tl.float32:
        bits = value.to(tl.int32, bitcast=True)
        value = (bits + 0x7FFF + ((bits >> 16) & 1)).to(tl.float32, bitcast=True)
    return value.to(dtype)


@triton.jit
def last_to_arrive(counter_ptr, arrivals):
    """True in the one program, of the `arrivals` that reach this for the counter, that reaches it last.
    The barrier and the atomic's release make every store the program made before visible to that
    one, whose acquire orders its loads after them. That program sets the count back to 0 (no other
    program of the launch touches it again), so the counts are zeros again when the kernel ends and
    the next kernel can use them without a fill."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == arrivals - 1
    tl.store(counter_ptr, 0, mask=last)
    return last


@triton.jit
def sum_of_partials(part_ptr, offsets, mask, splits, split_stride):
    """The fp32 sum, in split order, of the `splits` partial tiles at `offsets` past each split's start.
    Loaded past L1 (`.cg`): other multiprocessors wrote them."""
    total = tl.load(part_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    for split in range(1, splits):
        total += tl.load(part_ptr + split * split_stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def lora_down_kernel(x_ptr, a_ptr, u_ptr, part_ptr, counter_ptr, seed_ptr, M, K, splits, cols_per_split,
                     threshold, scale, R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """u[rows] = dropped x[rows] @ A.T for one block of rows, summed over `splits` programs that each take
    `cols_per_split` of the columns."""
    row_block = tl.program_id(0)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
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
                    other=0.0)
        acc = mma(x, rounded(a, x_ptr.dtype.element_ty, INTERPRETER), acc, PRECISION, INTERPRETER)
    tile = rows.to(tl.int64)[:, None] * R + ranks[None, :]
    in_tile = row_in[:, None] & (ranks[None, :] < R)
    tl.store(part_ptr + split * M * R + tile, acc * scale, mask=in_tile)
    if last_to_arrive(counter_ptr + row_block, splits):
        u = sum_of_partials(part_ptr, tile, in_tile, splits, M * R)
        tl.store(u_ptr + tile, rounded(u, u_ptr.dtype.element_ty, INTERPRETER), mask=in_tile)


@triton.jit
def lora_down_grad_weight_kernel(g_ptr, x_ptr, grad_a_ptr, part_ptr, counter_ptr, seed_ptr, M, K, splits,
                                 rows_per_split, threshold, scale, R: tl.constexpr, R_PAD: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr,
                                 PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """grad_A[:, cols] = grad_u.T @ dropped x[:, cols] for one block of columns, summed over `splits`
    programs that each take `rows_per_split` of the rows."""
    col_block = tl.program_id(0)
    cols = col_block * BLOCK_K + tl.arange(0, BLOCK_K)
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
        acc = mma(tl.trans(g), x, acc, PRECISION, INTERPRETER)
    tile = ranks[:, None] * K + cols[None, :]
    in_tile = (ranks[:, None] < R) & col_in[None, :]
    tl.store(part_ptr + split * R * K + tile, acc * scale, mask=in_tile)
    if last_to_arrive(counter_ptr + col_block, splits):
        grad_a = sum_of_partials(part_ptr, tile, in_tile, splits, R * K)
        tl.store(grad_a_ptr + tile, rounded(grad_a, grad_a_ptr.dtype.element_ty, INTERPRETER), mask=in_tile)


@triton.jit
def lora_up_grads_kernel(g_ptr, u_ptr, b_ptr, grad_u_ptr, grad_b_ptr, part_u_ptr, part_b_ptr, counter_ptr,
                         M, N, col_splits, cols_per_split, R: tl.constexpr, R_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                         INTERPRETER: tl.constexpr):
    """For g = grad_out [M, N], u [M, R] and B [N, R]: grad_u = g @ B and grad_B = g.T @ u from one read
    of g. Program (i, j) sweeps block i of BLOCK_M rows over the columns of split j, one tile at a time:
    grad_u's share of its rows adds up in registers (partial over the column splits), and each tile's
    share of grad_B is whole over the block's rows and stored as it is (partial over the row blocks).
    The last program to finish a row block sums its grad_u, the last to finish a column split its grad_B."""
    row_block = tl.program_id(0)
    col_split = tl.program_id(1)
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    rank_in = ranks < R
    row_in = rows < M
    u_tile = rows[:, None] * R + ranks[None, :]
    u_in = row_in[:, None] & rank_in[None, :]
    u = tl.load(u_ptr + u_tile, mask=u_in, other=0.0)
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * N
    col_start = col_split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    acc_u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(col_start, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_in = cols < col_end
        b_tile = cols[:, None] * R + ranks[None, :]
        b_in = col_in[:, None] & rank_in[None, :]
        g = tl.load(g_rows + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)
        b = tl.load(b_ptr + b_tile, mask=b_in, other=0.0)
        acc_u = mma(g, rounded(b, g_ptr.dtype.element_ty, INTERPRETER), acc_u, PRECISION, INTERPRETER)
        grad_b = mma(tl.trans(g), u, tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32), PRECISION, INTERPRETER)
        tl.store(part_b_ptr + row_block * N * R + b_tile, grad_b, mask=b_in)
    tl.store(part_u_ptr + col_split * M * R + u_tile, acc_u, mask=u_in)
    if last_to_arrive(counter_ptr + row_block, col_splits):
        grad_u = sum_of_partials(part_u_ptr, u_tile, u_in, col_splits, M * R)
        tl.store(grad_u_ptr + u_tile, rounded(grad_u, grad_u_ptr.dtype.element_ty, INTERPRETER), mask=u_in)
    row_blocks = tl.num_programs(0)
    if last_to_arrive(counter_ptr + row_blocks + col_split, row_blocks):
        for n0 in range(col_start, col_end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            b_tile = cols[:, None] * R + ranks[None, :]
            b_in = (cols < col_end)[:, None] & rank_in[None, :]
            grad_b = sum_of_partials(part_b_ptr, b_tile, b_in, row_blocks, N * R)
            tl.store(grad_b_ptr + b_tile, rounded(grad_b, grad_b_ptr.dtype.element_ty, INTERPRETER), mask=b_in)


@triton.jit
def lora_down_grad_input_kernel(g_ptr, a_ptr, addend_ptr, out_ptr, seed_ptr, M, K, threshold, scale,
                                R: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_K: tl.constexpr, DROPOUT: tl.constexpr, ADD: tl.constexpr,
                                PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R_PAD)
    row_in = rows < M
    col_in = cols < K
    g = tl.load(g_ptr + rows[:, None] * R + ranks[None, :], mask=row_in[:, None] & (ranks[None, :] < R), other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * K + cols[None, :], mask=(ranks[:, None] < R) & col_in[None, :],
                other=0.0)
    a = rounded(a, g_ptr.dtype.element_ty, INTERPRETER)
    y = mma(g, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PRECISION, INTERPRETER) * scale
    if DROPOUT:
        y = tl.where(kept(row_hashes(seed_ptr, rows), cols, threshold), y, 0.0)
    offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    if ADD:
        y += tl.load(addend_ptr + offsets, mask=row_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
    y = rounded(y, out_ptr.dtype.element_ty, INTERPRETER)
    tl.store(out_ptr + offsets, y, mask=row_in[:, None] & col_in[None, :])
