"""The 4-bit dequantization kernel (finetune/speed/dequant_kernels.py) against bitsandbytes, bit for bit.

On the CPU the real kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Checked: NF4 and FP4, nested absmax or not, bf16/fp16/fp32 output, blocksizes 32 to 256, element counts
that are not a multiple of the blocksize, of a tile or of 2; tiles smaller than a quantization block;
and torch.compile tracing the op through its fake implementation.
"""

import pytest
import torch
from bitsandbytes import functional as F

from finetune.speed import dequant_kernels
from finetune.speed.dequant_kernels import dequantize_4bit

# Shapes (rows, columns): 5120 elements (2560 packed bytes: one full tile and a part); odd element
# counts (bitsandbytes pads the last byte) not a multiple of any blocksize; 2500, even but not a
# multiple of 2 x blocksize; 10240 elements, more than 256 blocks of 32 or 64 (two nested blocks).
# bitsandbytes' CPU kernel gets columns that are even but not a multiple of the blocksize wrong
# (test_matches_definition_where_bnb_cpu_differs); these shapes avoid that.
SHAPES = [(20, 256), (37, 51), (45, 101), (1, 3), (2500, 1), (40, 256)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def quantized(shape, dtype, blocksize, nested, quant_type, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(*shape, dtype=dtype) * 0.02
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def reference(packed: torch.Tensor, state) -> torch.Tensor:
    """The definition in plain torch: element 2i is byte i's high nibble, 2i + 1 its low one; element e
    is code[nibble] * absmax[e // blocksize] in fp32, absmax itself code2[q] * absmax2[b // 256] + offset
    when nested; rounded once to the output dtype."""
    absmax = state.absmax
    if state.nested:
        s2 = state.state2
        blocks = torch.arange(absmax.numel()) // s2.blocksize
        absmax = s2.code[absmax.long()] * s2.absmax[blocks] + state.offset  # two roundings: no FMA on the CPU
    n = state.shape.numel()
    b = packed.reshape(-1).long()
    nibbles = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]
    return (state.code[nibbles] * absmax[torch.arange(n) // state.blocksize]).to(state.dtype).view(state.shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_equals_bitsandbytes(quant_type, nested, blocksize):
    for dtype in DTYPES:
        for shape in SHAPES:
            packed, state = quantized(shape, dtype, blocksize, nested, quant_type)
            expected = F.dequantize_4bit(packed, state)
            got = dequantize_4bit(packed, state)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(got, expected), f"{quant_type} nested={nested} {dtype} {shape} blocksize {blocksize}"
            assert torch.equal(got, reference(packed, state))


@pytest.mark.parametrize("tile_bytes", [16, 64, 512])
def test_tiles_smaller_than_a_block(monkeypatch, tile_bytes):
    """A tile of fewer packed bytes than a quantization block: rows of the tile narrower than a block,
    several programs per block."""
    monkeypatch.setitem(dequant_kernels.LAUNCH, "TILE_BYTES", tile_bytes)
    for nested in [False, True]:
        packed, state = quantized((37, 51), torch.bfloat16, 256, nested, "nf4")
        assert torch.equal(dequantize_4bit(packed, state), F.dequantize_4bit(packed, state))


def test_matches_definition_where_bnb_cpu_differs():
    """Columns even but not a multiple of the blocksize: bitsandbytes 0.50's CPU kernel indexes absmax
    per row, against its own quantize_4bit and CUDA kernel (flat blocks); the kernel follows those."""
    for nested in [False, True]:
        packed, state = quantized((64, 96), torch.bfloat16, 64, nested, "nf4")
        assert torch.equal(dequantize_4bit(packed, state), reference(packed, state))


def test_bitsandbytes_transposed_layout():
    """A packed weight of one row of bytes comes back transposed, as bitsandbytes returns it."""
    packed, state = quantized((1, 2), torch.float32, 64, False, "nf4")
    assert packed.shape[0] == 1
    assert torch.equal(dequantize_4bit(packed, state), F.dequantize_4bit(packed, state))


def test_compiles(fresh_compile_cache):
    """torch.compile traces the op whole (its fake implementation gives the output's shape and dtype)."""
    packed, state = quantized((20, 256), torch.bfloat16, 64, True, "nf4")
    s2 = state.state2

    def scaled(packed, absmax, code, nested_absmax, nested_code, offset):
        return torch.ops.finetune.dequantize_4bit(packed, absmax, code, 64, 20, 256, torch.bfloat16, nested_absmax,
                                                  nested_code, offset, 256) * 2

    args = (packed, state.absmax, state.code, s2.absmax, s2.code, state.offset.reshape(1))
    compiled = torch.compile(scaled, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), F.dequantize_4bit(packed, state) * 2)
